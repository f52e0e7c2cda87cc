"""False alarms and detection power of the poisoning consistency checks, on synthetic experts.

Three measurements (``router_training/consistency.py``, default thresholds):

1. the mean-copy test on pairs of honest experts whose data come from the *same* distribution
   (the hardest honest case: only sampling noise separates their means), at several p-values;
2. the whole screen over sets of honest synthetic experts with PHATGOOSE gates (different tasks);
3. detection: a planted expert whose mean is another's plus noise of a given fraction of the
   honest sampling variance, and one whose gates are scaled by a given factor, among 20 honest;
4. the same on experts *trained* by the contributor client on the tiny test BERT (toy tasks,
   gate steps 50 to 300, as contributors may choose): honest ones flagged, each expert in turn
   with its gates scaled or its mean replaced by another's, among the others.

    python benchmarks/consistency_checks.py [--pairs 2000] [--experts 300] [--sets 5] [--trained 11]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moerge.router_training.base import ExpertRecord, ExpertStatistics
from moerge.router_training.consistency import ConsistencyConfig, copy_threshold, screen
from moerge.router_training.synthetic import minilm_modules, synthetic_gaussian_experts

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, RANK = 384, 8
GATES = {module: d_in for module, (d_in, _) in minilm_modules().items()}  # 12 modules


def same_distribution_pairs(pairs: int, p: float, gen: torch.Generator) -> int:
    """How many honest same-distribution pairs the mean-copy test flags at ``p``."""
    flagged = 0
    for _ in range(pairs):
        factor = torch.randn(HIDDEN, RANK, generator=gen) * math.sqrt(0.1 / (HIDDEN * RANK))
        diag = torch.rand(HIDDEN, generator=gen) * 0.2 / HIDDEN
        centre = torch.randn(HIDDEN, generator=gen) * 0.05
        pair = []
        for n in torch.randint(20, 2000, (2,), generator=gen).tolist():
            noise = factor @ torch.randn(RANK, generator=gen)
            noise += diag.sqrt() * torch.randn(HIDDEN, generator=gen)
            mean = centre + noise / math.sqrt(n)
            pair.append(ExpertStatistics(n, mean, cov_diag=diag, cov_factor=factor))
        distance = float((pair[0].mean - pair[1].mean).square().sum())
        flagged += distance < copy_threshold(pair[0], pair[1], p)
    return flagged


def planted_caught(mean_noise: float | None, gate_scale: float, seeds: int = 20) -> int:
    """Of ``seeds`` runs, how often a planted expert among 20 honest ones is flagged."""
    caught = 0
    for seed in range(seeds):
        honest = synthetic_gaussian_experts(20, seed=seed, gate_modules=GATES)
        gen = torch.Generator().manual_seed(seed)
        victim, template = honest[0].statistics, honest[1].statistics
        assert victim is not None and template is not None
        if mean_noise is None:
            mean = torch.randn(HIDDEN, generator=gen) * 0.05
        else:
            variance = 2 * float(victim.cov_diag.sum() + victim.cov_factor.square().sum())
            noise = torch.randn(HIDDEN, generator=gen)
            mean = victim.mean + noise / noise.norm() * math.sqrt(
                mean_noise * variance / victim.example_count
            )
        gates = {m: g * gate_scale for m, g in template.gates.items()}
        stats = ExpertStatistics(
            victim.example_count, mean, victim.cov_diag, victim.cov_factor, gates
        )
        records = [*honest, ExpertRecord("planted", statistics=stats)]
        owners = {r.expert_id: r.expert_id for r in records}
        caught += any(
            f.expert_id == "planted" for f in screen(records, owners, ConsistencyConfig())
        )
    return caught


def trained_experts(root: Path, count: int) -> list[ExpertRecord]:
    """Honest experts built by the real contributor client on toy data (tiny BERT)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the tiny model and toy data live in tests/
    from moerge.contributor_client.build import build_expert
    from moerge.contributor_client.gates import GateConfig
    from moerge.coordinator.services.expert_store import read_statistics
    from tests.contributor_client.toy import toy_config, toy_examples, write_jsonl
    from tests.tiny_models import make_tiny_bert

    bert = make_tiny_bert(root / "tiny-bert")
    records = []
    for seed in range(count):
        steps = (100, 100, 50, 100, 200, 100, 300, 100)[seed % 8]
        texts, labels = toy_examples(40 + 20 * (seed % 5), seed=seed)
        if seed % 2:  # another task on the same words: short vs long texts
            labels = ["long" if len(t.split()) > 6 else "short" for t in texts]
        data = write_jsonl(root / f"d{seed}.jsonl", texts, labels)
        build_expert(
            data,
            root / f"e{seed}",
            f"task{seed}",
            toy_config(bert, epochs=2),
            gate_config=GateConfig(steps=steps, seed=seed),
            progress=False,
        )
        stats = read_statistics(root / f"e{seed}")
        records.append(ExpertRecord(f"trained-{seed}-steps{steps}", statistics=stats))
    return records


def each_in_turn(
    records: list[ExpertRecord], make: Callable[[int, ExpertStatistics], ExpertStatistics]
) -> int:
    """How often the poisoned version of each expert is flagged among all the others."""
    caught = 0
    for i, record in enumerate(records):
        others = records[:i] + records[i + 1 :]
        planted = ExpertRecord("planted", statistics=make(i, record.statistics))
        everyone = [*others, planted]
        owners = {r.expert_id: r.expert_id for r in everyone}
        caught += any(
            f.expert_id == "planted" for f in screen(everyone, owners, ConsistencyConfig())
        )
    return caught


def trained(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        records = trained_experts(Path(tmp), count)
    owners = {r.expert_id: r.expert_id for r in records}
    norms = [float(g.norm()) for r in records if r.statistics for g in r.statistics.gates.values()]
    print(f"trained gate norms: {min(norms):.3g} to {max(norms):.3g}")
    print(
        f"{count} trained honest experts: {len(screen(records, owners, ConsistencyConfig()))} "
        "flagged"
    )
    for scale in (2.0, 3.0, 4.0, 5.0, 10.0):
        caught = each_in_turn(
            records,
            lambda i, s, k=scale: ExpertStatistics(
                s.example_count,
                s.mean + 0.01,
                s.cov_diag,
                s.cov_factor,
                {m: g * k for m, g in s.gates.items()},
            ),
        )
        print(f"trained experts, gates x{scale:g}: {caught}/{count} caught")
    caught = each_in_turn(
        records,
        lambda i, s: ExpertStatistics(
            s.example_count,
            records[(i + 1) % count].statistics.mean.clone(),
            s.cov_diag,
            s.cov_factor,
            s.gates,
        ),
    )
    print(f"trained experts, mean replaced by another's: {caught}/{count} caught")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--experts", type=int, default=300)
    parser.add_argument("--sets", type=int, default=5)
    parser.add_argument("--trained", type=int, default=11, help="0 skips the trained experts")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    for p in (1e-2, 1e-3, 1e-6):
        flagged = same_distribution_pairs(args.pairs, p, gen)
        print(f"same-distribution honest pairs, p={p:g}: {flagged}/{args.pairs} flagged")
    for seed in range(args.sets):
        experts = synthetic_gaussian_experts(args.experts, seed=seed, gate_modules=GATES)
        owners = {e.expert_id: e.expert_id for e in experts}
        started = time.perf_counter()
        findings = screen(experts, owners, ConsistencyConfig())
        seconds = time.perf_counter() - started
        print(
            f"{args.experts} honest experts (seed {seed}): {len(findings)} flagged, "
            f"screen {seconds:.2f} s"
        )
    for fraction in (0.0, 0.1, 0.3, 0.5, 1.0):
        print(
            f"mean copy + noise at {fraction:.0%} of the honest sampling variance: "
            f"{planted_caught(fraction, 1.0)}/20 caught"
        )
    for scale in (1.5, 2.0, 3.0, 4.0, 10.0):
        print(f"gates x{scale:g}: {planted_caught(None, scale)}/20 caught")
    if args.trained:
        trained(args.trained)


if __name__ == "__main__":
    main()
