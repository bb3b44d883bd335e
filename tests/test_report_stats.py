"""The bench report's statistics on synthetic evaluation records (no training): the hierarchical bootstrap,
net accuracy flips, final/best/area, the reward-hacking gap, the claims' verdicts, and the refusals to mix
suites, seed sets or evaluation protocols."""

import json
import subprocess
import sys

import numpy as np
import pytest

from rl4diffusion.errors import ConfigError
from rl4diffusion.training.report import (
    EVALUATOR_LOGPROB,
    REFUTED,
    SUPPORTED,
    TRAINING_REWARD,
    accuracy_flips,
    algorithm_stats,
    area_under_curve,
    best_value,
    bootstrap,
    final_value,
    hacking_gap,
    net_flips,
    runs_by_algorithm,
    write_report,
)
from tests.mistakes import ROOT


def evaluation(algo, seed, step, judge, evaluator, *, suite="synthetic", prompt_set="train", **extra):
    """One evaluation record as the bench writes it, from per-image training rewards and evaluator log-probs."""
    correct = [int(v > -1.0) for v in evaluator]
    return {"suite": suite, "algo": algo, "seed": seed, "step": step, "phase": "eval", "prompt_set": prompt_set,
            "reward_queries": 256 * step, "train_cpu_s": 10.0 * step, "wall_s": 12.0 * step,
            "reward_mean": float(np.mean(judge)), "sample_rewards": [float(v) for v in judge],
            "evaluator_logprob": float(np.mean(evaluator)), "sample_evaluator_logprob": [float(v) for v in evaluator],
            "evaluator_accuracy": float(np.mean(correct)), "sample_evaluator_correct": correct,
            "evaluator_diversity": 0.1, "diversity": 0.1, "win_n": len(judge), **extra}


def suite_rows(gains, *, seeds=(0, 1, 2), images=24, evaluations=3, shared_noise=False, **extra):
    """Rows of a synthetic suite: ``gains`` maps an algorithm to its final (training-judge, evaluator) gain over
    the base model, reached linearly over ``evaluations`` evaluations; each seed has its own base images (its own
    evaluation noise; with ``shared_noise`` all seeds share seed 0's), shared by every algorithm of that seed, and
    small per-image noise."""
    rows = []
    for seed in seeds:
        base_rng = np.random.default_rng(100 + (0 if shared_noise else seed))
        base_judge, base_evaluator = base_rng.normal(-2.0, 1.0, images), base_rng.normal(-1.5, 1.0, images)
        for algo_index, (algo, (judge_gain, evaluator_gain)) in enumerate(sorted(gains.items())):
            noise = np.random.default_rng(1000 * seed + algo_index)
            rows.append(evaluation(algo, seed, 0, base_judge, base_evaluator, **extra))
            for step in range(1, evaluations + 1):
                share = step / evaluations
                rows.append(evaluation(algo, seed, step, base_judge + share * judge_gain + noise.normal(0, 0.1, images),
                                       base_evaluator + share * evaluator_gain + noise.normal(0, 0.1, images),
                                       **extra))
    return rows


def write_rows(directory, rows):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def test_the_hierarchical_bootstrap_covers_the_mean_narrows_with_seeds_and_is_deterministic():
    true_mean = 1.0
    rng = np.random.default_rng(0)

    def seeds_of(n):  # each training seed shifts its images' mean; images vary around it
        return [true_mean + rng.normal(0, 0.3) + rng.normal(0, 1.0, 30) for _ in range(n)]

    few, many = bootstrap(seeds_of(3), "few"), bootstrap(seeds_of(24), "many")
    assert few.low < true_mean < few.high and many.low < true_mean < many.high
    assert many.high - many.low < (few.high - few.low) / 2
    # over many synthetic suites of 10 seeds, the 95 % interval covers the true mean most of the time
    covered = [e.low < true_mean < e.high for e in (bootstrap(seeds_of(10), f"suite {i}", draws=400)
                                                     for i in range(150))]
    assert 0.85 <= np.mean(covered) <= 0.995
    # the same inputs give the same bytes: a fixed random stream per statistic
    values = seeds_of(4)
    assert bootstrap(values, "x").draws.tobytes() == bootstrap(values, "x").draws.tobytes()
    assert bootstrap(values, "x").draws.tobytes() != bootstrap(values, "y").draws.tobytes()


def test_net_accuracy_flips_count_wrong_to_right_minus_right_to_wrong():
    base = {0: [1, 0, 0, 1, 0, 1], 1: [0, 0, 1, 1, 1, 0]}
    final = {0: [1, 1, 0, 0, 1, 1], 1: [0, 0, 0, 1, 0, 0]}
    for seed in base:
        expected_up = sum(1 for b, f in zip(base[seed], final[seed]) if b == 0 and f == 1)
        expected_down = sum(1 for b, f in zip(base[seed], final[seed]) if b == 1 and f == 0)
        assert accuracy_flips(base[seed], final[seed]) == (expected_up, expected_down)
    rows = []
    for seed in base:
        for step, correct in ((0, base[seed]), (1, final[seed])):
            record = evaluation("algo", seed, step, [0.0] * 6, [0.0] * 6)
            record.update(sample_evaluator_correct=correct, evaluator_accuracy=float(np.mean(correct)))
            rows.append(record)
    flips = net_flips(runs_by_algorithm(rows, "train")["algo"])
    per_seed = [sum(f) - sum(b) for b, f in zip(base.values(), final.values())]  # net = Δ(number right)
    assert flips.wrong_to_right == sum(accuracy_flips(base[s], final[s])[0] for s in base)
    assert flips.right_to_wrong == sum(accuracy_flips(base[s], final[s])[1] for s in base)
    assert flips.net_per_seed.value == pytest.approx(np.mean(per_seed))
    assert flips.net_fraction.value == pytest.approx(np.mean(per_seed) / 6)
    assert flips.net_fraction.low <= flips.net_fraction.value <= flips.net_fraction.high


def test_area_of_a_constant_curve_is_the_constant_and_best_is_at_least_final():
    assert area_under_curve([0, 256, 512, 1536], [-1.25] * 4) == pytest.approx(-1.25)
    assert area_under_curve([0, 10], [0.0, 10.0], upto=4) == pytest.approx(2.0)  # y = x, mean height on [0, 4]
    assert area_under_curve([0, 10], [0.0, 10.0], upto=20) is None  # the curve does not reach the range
    runs = runs_by_algorithm(suite_rows({"a": (1.0, 0.5), "b": (-1.0, -0.5)}), "train")
    for algo in runs:
        for measure in (TRAINING_REWARD, EVALUATOR_LOGPROB):
            assert best_value(runs[algo], measure).value >= final_value(runs[algo], measure).value


def test_the_hacking_gap_is_the_judges_gain_minus_the_evaluators():
    runs = runs_by_algorithm(suite_rows({"hacker": (2.0, 0.0)}), "train")["hacker"]
    gap = hacking_gap(runs)
    judge_gain = np.mean([np.mean(np.subtract(r.final["sample_rewards"], r.base["sample_rewards"])) for r in runs])
    evaluator_gain = np.mean([np.mean(np.subtract(r.final["sample_evaluator_logprob"],
                                                  r.base["sample_evaluator_logprob"])) for r in runs])
    assert gap.value == pytest.approx(judge_gain - evaluator_gain) and gap.low > 1.5
    scales = (2.0, 0.5)
    assert hacking_gap(runs, scales).value == pytest.approx(judge_gain / 2.0 - evaluator_gain / 0.5)


def test_the_report_refuses_to_mix_suites_or_seed_sets_and_states_allowed_seed_sets(tmp_path):
    mixed = suite_rows({"ddpo": (1.0, 1.0)}, seeds=(0,)) + suite_rows({"refl": (1.0, 1.0)}, seeds=(0,), suite="other")
    with pytest.raises(ConfigError, match="synthetic: 4 rows, other: 4 rows|other: 4 rows, synthetic: 4 rows") as e:
        write_report(write_rows(tmp_path / "mixed", mixed))
    assert "\n" not in str(e.value)
    unequal = suite_rows({"ddpo": (1.0, 1.0)}, seeds=(0, 1, 2)) + suite_rows({"refl": (1.0, 1.0)}, seeds=(1,))
    with pytest.raises(ConfigError) as e:
        write_report(write_rows(tmp_path / "unequal", unequal))
    assert "ddpo: seeds 0, 1, 2" in str(e.value) and "refl: seeds 1" in str(e.value)
    report = write_report(tmp_path / "unequal", allow_unequal_seeds=True).read_text()
    assert "Seeds differ between algorithms" in report and "ddpo 0, 1, 2; refl 1" in report
    # one run whose evaluations scored different numbers of images (samples per prompt changed on resume)
    changed = suite_rows({"ddpo": (1.0, 1.0)}, seeds=(0,))
    changed[-1] = evaluation("ddpo", 0, 3, [0.0] * 12, [0.0] * 12)
    with pytest.raises(ConfigError, match="ddpo seed 0 scored different numbers of images"):
        write_report(write_rows(tmp_path / "changed", changed))


def test_claims_verdicts_follow_the_data_and_the_report_regenerates_byte_identically(tmp_path):
    algos = ["ddpo", "nabla_gfn", "refl", "draft", "diffusion_dpo", "sdpo", "dpo_cm"]

    def claims(directory, dmpo_gain, dpo_gain, ddpo_gain):
        gains = {a: (0.5, 0.5) for a in algos} | {"dmpo": (1.0, dmpo_gain), "diffusion_dpo": (1.0, dpo_gain),
                                                  "ddpo": (1.0, ddpo_gain)}
        rows = suite_rows(gains) + [evaluation("best_of_4", 0, 0, [0.0] * 24, [0.0] * 24, baseline=True)]
        write_report(write_rows(directory, rows))
        return json.loads((directory / "claims.json").read_text()), (directory / "claims.md").read_text()

    forward, forward_md = claims(tmp_path / "forward", dmpo_gain=1.5, dpo_gain=0.0, ddpo_gain=-1.0)
    reverse, reverse_md = claims(tmp_path / "reverse", dmpo_gain=0.0, dpo_gain=1.5, ddpo_gain=2.0)

    def verdict(data, paper):
        return next(c["verdict"] for c in data["claims"] if c["paper"].startswith(paper))

    assert verdict(forward, "DMPO") == SUPPORTED and verdict(reverse, "DMPO") == REFUTED
    assert verdict(forward, "∇-GFlowNet") == SUPPORTED and verdict(reverse, "∇-GFlowNet") == REFUTED
    assert "DMPO beats Diffusion-DPO" in forward_md and f"**{SUPPORTED}**" in forward_md
    assert f"**{REFUTED}**" in reverse_md
    # a method whose evaluator gain lies below 0 is named; the baseline is a marked reference row
    assert "ddpo did not improve on the base model under the evaluator log-prob" in forward_md
    report = (tmp_path / "forward" / "report.md").read_text()
    assert "**ddpo did not improve on the base under the evaluator log-prob**" in report
    assert "best_of_4 *(baseline)*" in report and "Seeds 0, 1, 2 for every training algorithm" in report
    # the same evals.jsonl gives the same bytes
    before = {f: (tmp_path / "forward" / f).read_bytes() for f in ("report.md", "claims.md", "claims.json")}
    write_report(tmp_path / "forward")
    assert before == {f: (tmp_path / "forward" / f).read_bytes() for f in before}


def test_algorithm_stats_without_evaluator_fields_fall_back_to_the_training_reward():
    rows = suite_rows({"ddpo": (1.0, 1.0)})
    for r in rows:  # a suite from before the held-out evaluator
        for key in [k for k in r if k.startswith(("evaluator_", "sample_evaluator_"))]:
            del r[key]
    stats = algorithm_stats(runs_by_algorithm(rows, "train"))["ddpo"]
    assert stats.estimates["gain training reward"].low > 0.5
    assert stats.estimates["gain evaluator log-prob"] is None and stats.flips is None
    assert stats.estimates["hacking gap"] is None


def test_the_report_script_refuses_a_mixed_file_with_one_message(tmp_path):
    rows = suite_rows({"ddpo": (1.0, 1.0)}, seeds=(0,)) + suite_rows({"ddpo": (1.0, 1.0)}, seeds=(1,), suite="b")
    write_rows(tmp_path, rows)
    proc = subprocess.run([sys.executable, "benchmarks/report.py", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "2 suites" in proc.stderr
    assert not (tmp_path / "report.md").exists()


def test_speedup_to_reach_counts_the_queries_to_the_references_final_value():
    from rl4diffusion.training.report import EVALUATOR_LOGPROB, above_one, speedup_to_reach

    # grpo gains 1.0 over 4 evaluations; nft gains 3.0, so it passes 1.0 at its 2nd evaluation (gain 1.5;
    # 0.75 at the 1st): half grpo's final queries
    rows = suite_rows({"grpo": (1.0, 1.0), "nft": (3.0, 3.0)}, evaluations=4)
    runs = runs_by_algorithm(rows, "train")
    fast = speedup_to_reach(runs["nft"], runs["grpo"], EVALUATOR_LOGPROB, "reward_queries")
    assert fast.value == 4 / 2 and above_one(fast) == "supported"
    rows = suite_rows({"grpo": (1.0, 1.0), "nft": (0.3, 0.3)}, evaluations=4)  # never reaches it
    runs = runs_by_algorithm(rows, "train")
    slow = speedup_to_reach(runs["nft"], runs["grpo"], EVALUATOR_LOGPROB, "train_cpu_s")
    assert slow.value == 0.0 and above_one(slow) == "refuted"


def test_a_speedup_claim_against_a_reference_that_did_not_learn_cannot_be_told(tmp_path):
    from rl4diffusion.training.report import CANNOT_TELL

    def nft_verdict(directory, grpo_gain):
        rows = suite_rows({"grpo": (grpo_gain, grpo_gain), "nft": (3.0, 3.0)}, evaluations=4)
        write_report(write_rows(directory, rows))
        claims = json.loads((directory / "claims.json").read_text())["claims"]
        return next(c for c in claims if c["paper"].startswith("DiffusionNFT") and c["prompt_set"] == "train")

    # grpo learned: nft's speed-up decides (it reaches grpo's final at half the queries)
    assert nft_verdict(tmp_path / "learned", 1.0)["verdict"] == SUPPORTED
    # grpo ended below the base: the base model already "reaches" its final value at 0 queries, which says
    # nothing about nft, so the claim is not supported however large the capped speed-up
    vacuous = nft_verdict(tmp_path / "vacuous", -1.0)
    assert vacuous["verdict"] == CANNOT_TELL
    assert vacuous["evidence"][0]["what"].startswith("gain evaluator log-prob of grpo")
    assert vacuous["evidence"][0]["high"] < 0


def test_an_efficiency_claim_is_never_refuted_against_a_reference_that_did_not_learn(tmp_path):
    from rl4diffusion.training.report import CANNOT_TELL

    # grpo's gain is too small to tell from 0, and nft falls and never reaches grpo's final value: the speed-up
    # of 0 alone would refute the claim, but a reference that may not have learned leaves it undecided
    rows = suite_rows({"grpo": (0.0, 0.0), "nft": (-3.0, -3.0)}, evaluations=4, shared_noise=True)
    for base, final in zip(*([r for r in rows if r["algo"] == "grpo" and r["step"] == step] for step in (0, 4))):
        # every seed's mean ends 0.01 above its base, but image by image grpo moves ±2: a gain not told from 0
        swing = 2.0 * (-1) ** np.arange(len(base["sample_evaluator_logprob"]))
        values = np.array(base["sample_evaluator_logprob"]) + 0.01 + swing
        final.update(sample_evaluator_logprob=values.tolist(), evaluator_logprob=float(values.mean()))
    write_report(write_rows(tmp_path, rows))
    claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
    nft = next(c for c in claims if c["paper"].startswith("DiffusionNFT"))
    assert nft["evidence"][0]["low"] < 0 < nft["evidence"][0]["high"]  # grpo's gain
    assert nft["evidence"][1]["value"] == 0.0 and nft["evidence"][1]["high"] < 1  # the part that would refute
    assert nft["verdict"] == CANNOT_TELL


def test_a_run_that_learned_then_collapsed_is_named_by_seed(tmp_path):
    from rl4diffusion.training.report import runs_below_base

    rows = suite_rows({"steady": (1.0, 1.0), "fragile": (1.0, 1.0)}, evaluations=4)
    # fragile's seed 2 gains like the rest until its last evaluation, then falls 5 below its base
    last = next(r for r in rows if (r["algo"], r["seed"], r["step"]) == ("fragile", 2, 4))
    values = np.array(last["sample_evaluator_logprob"]) - 6.0
    last.update(sample_evaluator_logprob=values.tolist(), evaluator_logprob=float(values.mean()))
    below = runs_below_base(runs_by_algorithm(rows, "train"), EVALUATOR_LOGPROB)
    assert [(run.algo, run.seed) for run, *_ in below] == [("fragile", 2)]
    run, base, best, final = below[0]
    assert final < base < best  # it learned (best above base) and then fell below where it started
    write_report(write_rows(tmp_path, rows))
    report = (tmp_path / "report.md").read_text()
    assert f"| fragile | 2 | {base:.3f} | {best:.3f} | {final:.3f} |" in report
    write_report(write_rows(tmp_path, suite_rows({"steady": (1.0, 1.0)})))
    assert "No training run's final evaluator log-prob is below the base model's." in (tmp_path / "report.md").read_text()


def test_a_capped_speedup_is_written_as_words_not_as_the_cap():
    from rl4diffusion.training.report import SPEEDUP_CAP, Estimate

    # the base already at the reference's value: reached with 0 queries, a speed-up only the cap can hold
    at_cap = Estimate(SPEEDUP_CAP, 2.0, SPEEDUP_CAP, 3, np.zeros(1))
    assert at_cap.text() == "capped (reached at 0) [2.000, capped (reached at 0)]"
    assert Estimate(1.5, 0.5, 2.5, 3, np.zeros(1)).text() == "1.500 [0.500, 2.500]"


def test_claims_are_decided_on_shared_seeds_and_only_on_enough_of_them(tmp_path):
    from rl4diffusion.training.report import CANNOT_TELL, MIN_SEEDS

    def dmpo_claim(directory, rows):
        write_report(write_rows(directory, rows), allow_unequal_seeds=True)
        claims = json.loads((directory / "claims.json").read_text())["claims"]
        return next(c for c in claims if c["paper"].startswith("DMPO") and c["prompt_set"] == "train")

    # DMPO clearly beats Diffusion-DPO on seeds 0-2; Diffusion-DPO also has a seed 3 that DMPO lacks, on which it
    # soars. Compared on the shared seeds, the verdict stands and rests on 3 seeds; pooling seed 3 in would not
    rows = suite_rows({"dmpo": (1.5, 1.5), "diffusion_dpo": (0.0, 0.0)})
    rows += suite_rows({"diffusion_dpo": (9.0, 9.0)}, seeds=(3,))
    shared = dmpo_claim(tmp_path / "shared", rows)
    assert shared["verdict"] == SUPPORTED and shared["evidence"][0]["seeds"] == 3
    assert shared["evidence"][0]["value"] == pytest.approx(1.5, abs=0.1)
    # the same gap on MIN_SEEDS − 1 shared seeds is not decided
    few = dmpo_claim(tmp_path / "few", suite_rows({"dmpo": (1.5, 1.5), "diffusion_dpo": (0.0, 0.0)},
                                                  seeds=tuple(range(MIN_SEEDS - 1))))
    assert few["evidence"][0]["low"] > 0 and few["verdict"] == f"{CANNOT_TELL} ({MIN_SEEDS - 1} shared seeds)"


def test_the_base_model_row_counts_each_seed_once(tmp_path):
    write_report(write_rows(tmp_path, suite_rows({"ddpo": (1.0, 1.0), "refl": (1.0, 1.0), "draft": (1.0, 1.0)})))
    report = (tmp_path / "report.md").read_text()
    assert "| *base model* | train | 3 |" in report  # 3 seeds, not 3 algorithms × 3 seeds
