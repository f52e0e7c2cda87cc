"""Summary statistics of a contributor's data: what the coordinator routes with, never the data.

The data is embedded with the frozen *base* model (:func:`pooled_embeddings`, the shared
embedding space) and summarised by its count, label counts, mean ``mu`` [H] and covariance
``Cov`` [H, H] stored as low rank plus diagonal, ``Cov ~= U U^T + diag(D)``:

* ``U = V_k sqrt(lambda_k)`` [H, k] from the top-``k`` eigenpairs of the sample covariance
  (each column's sign fixed so that its largest entry is positive, for determinism);
* ``D = diag(Cov) - diag(U U^T)`` [H], the variance the low-rank part misses, floored at
  ``COV_DIAG_FLOOR`` so that ``U U^T + diag(D)`` is always invertible (a Gaussian density or a
  Mahalanobis distance can be evaluated at the coordinator). The diagonal of the approximation
  therefore equals the true variances wherever they exceed the floor.

The sample covariance is the unbiased one (``torch.cov``: divide by ``N - 1``; zero for N = 1).
With :class:`DPConfig`, count, sum and second moment are released with Gaussian noise
(:mod:`privacy`) and mean and covariance are derived from those releases alone, the covariance
denoised (:func:`denoise_covariance`: directions above the noise's spectrum kept, the rest
isotropic). Without DP, fewer than ``MIN_EXAMPLES_WITHOUT_DP`` examples are refused. See
:mod:`moerge.expert_format` for the keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from moerge.contributor_client.batching import load_tokenizer
from moerge.contributor_client.privacy import (
    MECHANISM,
    MIN_EXAMPLES_WITHOUT_DP,
    OFF_DIAGONAL_NOISE,
    DPConfig,
    clip_rows,
    privacy_report,
    privatize,
)
from moerge.embedding import (
    EMBEDDING_BATCH_SIZE,
    EMBEDDING_MAX_LENGTH,
    pooled_embeddings,
)
from moerge.expert_format import (
    COV_DIAG_KEY,
    COV_FACTOR_KEY,
    GATE_PREFIX,
    MEAN_KEY,
    STATISTICS_META,
    STATISTICS_TENSORS,
    DifferentialPrivacy,
    StatisticsMeta,
    gate_key,
)

#: Smallest value of the diagonal part D (embeddings have unit norm, so variances are ~1/H).
COV_DIAG_FLOOR = 1e-6
#: Default rank k of the covariance factor.
COVARIANCE_RANK = 16


@dataclass
class EmbeddingSummary:
    """The statistics of one set of embeddings (float64 tensors)."""

    count: int  # examples summarised (noisy and rounded under DP)
    label_counts: list[int]  # examples per label (noisy and rounded under DP)
    mean: torch.Tensor  # [H]
    cov_diag: torch.Tensor  # [H], D
    cov_factor: torch.Tensor  # [H, k], U
    noise_std: dict[str, float] = field(default_factory=dict)  # {} without DP


def compute_statistics(
    base_model_path: str | Path,
    texts: Sequence[str],
    labels: Sequence[str] | None,
    label_names: Sequence[str],
    task_name: str,
    task_description: str = "",
    rank: int = COVARIANCE_RANK,
    gates: Mapping[str, torch.Tensor] | None = None,
    dp: DPConfig | None = None,
    batch_size: int = EMBEDDING_BATCH_SIZE,
    *,
    task_type: str = "classification",
    max_length: int = EMBEDDING_MAX_LENGTH,
    base_model_id: str = "",
    base_model_revision: str = "",
) -> tuple[dict[str, torch.Tensor], StatisticsMeta]:
    """Embed ``texts`` with the frozen base model and summarise them.

    ``label_names`` fixes the order of ``label_counts`` (the head's output order); ``labels``
    may be None (causal LM). ``gates`` ({base-model module path: [d_in]}) are stored as
    ``gates.<path>``. ``base_model_id`` defaults to ``str(base_model_path)``. Returns the
    tensors of ``statistics.safetensors`` (float32) and the meta of ``statistics.json``.
    """
    if not texts:
        raise ValueError("statistics need at least one example")
    check_release_size(len(texts), dp)
    label_ids = _label_ids(labels, label_names, len(texts))
    tokenizer = load_tokenizer(str(base_model_path))
    model = AutoModel.from_pretrained(str(base_model_path), dtype=torch.float32)
    embeddings = pooled_embeddings(model, tokenizer, texts, batch_size, max_length)  # [N, H]
    summary = summarize_embeddings(embeddings, label_ids, len(label_names), rank, dp)

    tensors = {
        MEAN_KEY: summary.mean.float(),
        COV_DIAG_KEY: summary.cov_diag.float(),
        COV_FACTOR_KEY: summary.cov_factor.float().contiguous(),
    }
    for name, gate in (gates or {}).items():
        tensors[gate_key(name)] = gate.detach().float().cpu().contiguous()
    privacy = None
    if dp is not None:
        privacy = DifferentialPrivacy(
            epsilon=dp.epsilon,
            delta=dp.delta,
            clip_norm=dp.clip_norm,
            noise_std=summary.noise_std,
            mechanism=MECHANISM,
        )
    meta = StatisticsMeta(
        example_count=summary.count,
        hidden_size=int(embeddings.shape[1]),
        covariance_rank=int(summary.cov_factor.shape[1]),
        task_name=task_name,
        task_type=task_type,
        task_description=task_description,
        label_names=list(label_names),
        label_counts=summary.label_counts if label_ids is not None else [],
        base_model_id=base_model_id or str(base_model_path),
        base_model_revision=base_model_revision,
        gate_modules=list(gates or {}),
        dp=privacy,
        privacy=privacy_report(dp, opt_out=dp is None, adapter=None),
    )
    meta.validate()
    return tensors, meta


class TooFewExamples(ValueError):
    """Statistics without DP of fewer than :data:`MIN_EXAMPLES_WITHOUT_DP` examples."""


def check_release_size(count: int, dp: DPConfig | None) -> None:
    """Refuse statistics without DP of fewer than ``MIN_EXAMPLES_WITHOUT_DP`` examples: their
    mean is close to single texts' embeddings, which inversion attacks turn back into text."""
    if dp is None and count < MIN_EXAMPLES_WITHOUT_DP:
        raise TooFewExamples(
            f"statistics without differential privacy need at least {MIN_EXAMPLES_WITHOUT_DP} "
            f"examples, got {count}: keep DP on (drop --no-dp) or add examples"
        )


def summarize_embeddings(
    embeddings: torch.Tensor,
    label_ids: Sequence[int] | None = None,
    num_labels: int = 0,
    rank: int = COVARIANCE_RANK,
    dp: DPConfig | None = None,
) -> EmbeddingSummary:
    """Count, label counts, mean and low-rank + diagonal covariance of ``embeddings`` [N, H].

    Without labels the label counts are a single bin (the count). Under ``dp`` the embeddings
    are clipped, the four releases noised, and everything derived from the noisy releases.
    """
    x = embeddings.double()  # [N, H]
    bins = max(num_labels, 1)
    ids = torch.zeros(len(x), dtype=torch.long) if label_ids is None else torch.tensor(label_ids)
    if dp is not None:
        x = clip_rows(x, dp.clip_norm)
    counts = torch.bincount(ids, minlength=bins).double()  # [L]
    total = x.sum(dim=0)  # [H]
    second = x.T @ x  # [H, H]
    count = float(len(x))
    noise_std: dict[str, float] = {}
    if dp is not None:
        noisy = privatize(counts, total, second, dp)
        count, counts, total, second = noisy.count, noisy.label_counts, noisy.total, noisy.second
        noise_std = dict(noisy.noise_std)
    count = max(count, 1.0)
    mean, cov = mean_and_covariance(count, total, second)
    if dp is not None:
        off_diagonal = OFF_DIAGONAL_NOISE * noise_std["second_moment"]
        cov = denoise_covariance(cov, off_diagonal / max(count - 1.0, 1.0))
        noise_std["mean"] = noise_std["sum"] / count  # std of each mean entry, to first order
    factor, diag = low_rank_plus_diag(cov, rank)
    return EmbeddingSummary(
        count=max(1, round(count)),
        label_counts=[max(0, round(c)) for c in counts.tolist()],
        mean=mean,
        cov_diag=diag,
        cov_factor=factor,
        noise_std=noise_std,
    )


def mean_and_covariance(
    count: float, total: torch.Tensor, second: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [H] and unbiased covariance [H, H] from count, sum [H] and second moment [H, H].

    ``Cov = (M - n mu mu^T) / (n - 1)``, equal to ``torch.cov`` (zero when n = 1). Compute in
    float64: the subtraction cancels most of ``M``.
    """
    mean = total / count  # [H]
    cov = (second - count * torch.outer(mean, mean)) / max(count - 1.0, 1.0)  # [H, H]
    return mean, 0.5 * (cov + cov.T)


def nearest_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The positive semi-definite matrix nearest to symmetric ``matrix`` [H, H] (Frobenius)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0.0)) @ vectors.T


def denoise_covariance(cov: torch.Tensor, noise: float) -> torch.Tensor:
    """The covariance behind ``cov`` [H, H] = true + symmetric Gaussian noise of std ``noise``
    per off-diagonal entry (and ``sqrt(2) noise`` on the diagonal, as :func:`privacy.privatize`
    releases it): a positive semi-definite estimate (post-processing: no privacy cost).

    The noise's eigenvalues fill a semicircle of radius ``2 s``, ``s = noise sqrt(H)``; an
    eigenvalue above it is a true direction ``theta`` seen at ``theta + s^2 / theta``
    (Wigner spiked model), so it is kept as ``(lambda + sqrt(lambda^2 - 4 s^2)) / 2``; the
    rest is noise, replaced by the isotropic variance that the trace leaves. Measured against
    the nearest PSD matrix (which keeps half the noise as spurious directions): QDA routing
    at epsilon 4, 200 examples per task, 51% -> 81% (benchmarks/dp_statistics.py).
    """
    size = cov.shape[0]
    s = noise * math.sqrt(size)
    values, vectors = torch.linalg.eigh(0.5 * (cov + cov.T))
    spikes = values > 2.0 * s
    theta = torch.where(
        spikes,
        0.5 * (values + (values**2 - 4.0 * s * s).clamp(min=0.0).sqrt()),
        torch.zeros_like(values),
    )
    rest = (torch.diagonal(cov).sum() - theta.sum()) / max(size - int(spikes.sum()), 1)
    isotropic = float(rest.clamp(min=COV_DIAG_FLOOR))
    return (vectors * theta) @ vectors.T + isotropic * torch.eye(size, dtype=cov.dtype)


def low_rank_plus_diag(
    cov: torch.Tensor, rank: int, floor: float = COV_DIAG_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """``U`` [H, k] and ``D`` [H] with ``cov ~= U U^T + diag(D)``, ``k = min(rank, H)``.

    Off the diagonal the error is the discarded eigen-part, at most
    ``sqrt(sum_{i > k} lambda_i^2)`` in Frobenius norm; on it, only the ``floor``.
    """
    if rank < 0:
        raise ValueError(f"covariance rank must be >= 0, got {rank}")
    k = min(rank, cov.shape[0])
    values, vectors = torch.linalg.eigh(cov)  # ascending
    top_values = values.flip(0)[:k].clamp(min=0.0)  # [k]
    top_vectors = vectors.flip(1)[:, :k]  # [H, k]
    # Fix each eigenvector's sign (its largest-magnitude entry positive) for determinism.
    pivots = top_vectors.abs().argmax(dim=0)  # [k]
    signs = torch.sign(top_vectors[pivots, torch.arange(k)])  # [k]
    signs[signs == 0] = 1.0
    factor = top_vectors * signs * top_values.sqrt()  # [H, k]
    diag = (torch.diagonal(cov) - (factor**2).sum(dim=1)).clamp(min=floor)  # [H]
    return factor, diag


def save_statistics(
    out_dir: str | Path, tensors: Mapping[str, torch.Tensor], meta: StatisticsMeta
) -> None:
    """Write ``statistics.safetensors`` and ``statistics.json`` into ``out_dir``.

    Checks first that the tensors match the meta (shapes, gate keys), so that a written
    folder always passes the coordinator's validation.
    """
    meta.validate()
    hidden, rank = meta.hidden_size, meta.covariance_rank
    expected = {MEAN_KEY: (hidden,), COV_DIAG_KEY: (hidden,), COV_FACTOR_KEY: (hidden, rank)}
    for key, shape in expected.items():
        if key not in tensors or tuple(tensors[key].shape) != shape:
            found = tuple(tensors[key].shape) if key in tensors else "missing"
            raise ValueError(f"statistics tensor '{key}': expected shape {shape}, got {found}")
    gates = sorted(k.removeprefix(GATE_PREFIX) for k in tensors if k.startswith(GATE_PREFIX))
    if gates != sorted(meta.gate_modules):
        raise ValueError(f"gate tensors {gates} differ from meta.gate_modules")
    unknown = sorted(set(tensors) - set(expected) - {gate_key(g) for g in gates})
    if unknown:
        raise ValueError(f"unknown statistics tensors {unknown}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
        str(out_dir / STATISTICS_TENSORS),
    )
    meta.write(out_dir / STATISTICS_META)


def load_statistics(expert_dir: str | Path) -> tuple[dict[str, torch.Tensor], StatisticsMeta]:
    """Read what :func:`save_statistics` wrote (safetensors and JSON only, never pickle)."""
    expert_dir = Path(expert_dir)
    tensors = load_file(str(expert_dir / STATISTICS_TENSORS))
    return tensors, StatisticsMeta.read(expert_dir / STATISTICS_META)


def _label_ids(
    labels: Sequence[str] | None, label_names: Sequence[str], count: int
) -> list[int] | None:
    if labels is None or not label_names:
        return None
    if len(labels) != count:
        raise ValueError(f"{count} texts but {len(labels)} labels")
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among label_names {list(label_names)}")
    return [index[label] for label in labels]
