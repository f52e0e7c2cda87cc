"""Fit global routers over pooled LoRA experts from their adapters and uploaded statistics.

Importing this package registers every built-in method (see :mod:`.methods`):

=============  =========  =========================================================
method         routes     fitted from
=============  =========  =========================================================
``arrow``      tokens     LoRA factors (top right singular vector of ``B A``)
``phatgoose``  tokens     uploaded PHATGOOSE gate vectors
``centroid``   examples   uploaded mean embeddings (cosine retrieval)
``lda``        examples   uploaded Gaussian statistics (shared covariance)
``qda``        examples   uploaded Gaussian statistics (per-expert covariance)
``mlp``        examples   samples drawn from the uploaded Gaussians
``federated``  examples   LDA, then FedAvg rounds on contributors' own embeddings
``uniform``    both       nothing (every expert, weight 1/E)
``base``       both       nothing (no expert: ``k = 0``)
``oracle``     examples   nothing; evaluation only (each example's true source expert)
=============  =========  =========================================================
"""

from moerge.router_training.adapters import peft_lora_loader, read_peft_lora
from moerge.router_training.arrow import ArrowRouter, ArrowRouterConfig
from moerge.router_training.base import (
    ExpertRecord,
    ExpertStatistics,
    LoraModuleWeights,
    Router,
    RouterConfig,
    RoutingDecision,
    load_router,
    top_k_softmax,
)
from moerge.router_training.baselines import (
    BaseModelRouter,
    BaseModelRouterConfig,
    OracleRouter,
    OracleRouterConfig,
    UniformRouter,
    UniformRouterConfig,
)
from moerge.router_training.centroid import CentroidRouter, CentroidRouterConfig
from moerge.router_training.federated import FederatedRouter
from moerge.router_training.federated_base import FederatedRouterConfig
from moerge.router_training.fitting import FitResult, build_config, fit_metrics, fit_router
from moerge.router_training.gaussian import GaussianBank, GaussianRouter, GaussianRouterConfig
from moerge.router_training.lda import LDARouter, LDARouterConfig
from moerge.router_training.methods import available_methods, get_router_class, register_router
from moerge.router_training.mlp import MLPRouter, MLPRouterConfig
from moerge.router_training.phatgoose import PhatgooseRouter, PhatgooseRouterConfig
from moerge.router_training.policy import RetrainPolicy, expert_set_fingerprint
from moerge.router_training.qda import QDARouter, QDARouterConfig

__all__ = [
    "ArrowRouter",
    "ArrowRouterConfig",
    "BaseModelRouter",
    "BaseModelRouterConfig",
    "CentroidRouter",
    "CentroidRouterConfig",
    "ExpertRecord",
    "ExpertStatistics",
    "FederatedRouter",
    "FederatedRouterConfig",
    "FitResult",
    "GaussianBank",
    "GaussianRouter",
    "GaussianRouterConfig",
    "LDARouter",
    "LDARouterConfig",
    "LoraModuleWeights",
    "MLPRouter",
    "MLPRouterConfig",
    "OracleRouter",
    "OracleRouterConfig",
    "PhatgooseRouter",
    "PhatgooseRouterConfig",
    "QDARouter",
    "QDARouterConfig",
    "RetrainPolicy",
    "Router",
    "RouterConfig",
    "RoutingDecision",
    "UniformRouter",
    "UniformRouterConfig",
    "available_methods",
    "build_config",
    "expert_set_fingerprint",
    "fit_metrics",
    "fit_router",
    "get_router_class",
    "load_router",
    "peft_lora_loader",
    "read_peft_lora",
    "register_router",
    "top_k_softmax",
]
