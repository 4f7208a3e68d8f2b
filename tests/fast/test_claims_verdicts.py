"""The claims report's verdicts (benchmarks/claims.py): paired intervals, spread and share of full FT."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("claims", Path(__file__).parents[2] / "benchmarks" / "claims.py")
claims = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(claims)


def test_paired_interval_matches_hand_computation():
    a, b = {0: 0.70, 1: 0.72, 2: 0.68}, {0: 0.66, 1: 0.69, 2: 0.66}
    p = claims.paired_interval(a, b)
    diffs = [0.04, 0.03, 0.02]
    sd = math.sqrt(sum((d - 0.03) ** 2 for d in diffs) / 2)
    assert p["n"] == 3 and p["diff"] == pytest.approx(0.03)
    assert p["low"] == pytest.approx(0.03 - 4.303 * sd / math.sqrt(3))
    assert p["high"] == pytest.approx(0.03 + 4.303 * sd / math.sqrt(3))


def test_better_holds_only_when_the_paired_interval_is_above_zero():
    b = {0: 0.60, 1: 0.65, 2: 0.70}  # a large spread over seeds, but a steady paired gain
    a = {s: v + 0.02 + 0.001 * s for s, v in b.items()}
    assert claims.verdict_better(a, b, True, 0.005)["verdict"] == "holds"
    # the same gain on a lower-is-better metric is a loss
    assert claims.verdict_better(a, b, False, 0.005)["verdict"] == "does not hold at this scale"
    # equal scores: no gain beyond the margin
    assert claims.verdict_better(dict(b), b, True, 0.005)["verdict"] == "does not hold at this scale"
    # a noisy gain whose interval straddles the margin
    noisy = {0: b[0] + 0.03, 1: b[1] - 0.02, 2: b[2] + 0.01}
    assert claims.verdict_better(noisy, b, True, 0.005)["verdict"] == "inconclusive"


def test_better_needs_three_shared_seeds():
    a, b = {0: 0.7, 1: 0.7, 2: 0.7}, {0: 0.6, 1: 0.6}
    assert claims.verdict_better(a, b, True, 0.005)["verdict"] == "not run yet"


def test_steadier_uses_the_variance_ratio():
    b = {s: v for s, v in enumerate([0.60, 0.70, 0.65, 0.62, 0.68])}
    a = {s: 0.65 + 0.001 * (s - 2) for s in range(5)}  # far steadier
    assert claims.verdict_steadier(a, b)["verdict"] == "holds"
    assert claims.verdict_steadier(b, a)["verdict"] == "does not hold at this scale"
    a2 = {s: v + 0.001 * s for s, v in b.items()}  # about the same spread
    assert claims.verdict_steadier(a2, b)["verdict"].startswith(("inconclusive", "does not hold"))


def test_share_of_full():
    full = {0: 0.74, 1: 0.75, 2: 0.73}
    near = {s: 0.995 * v for s, v in full.items()}
    far = {s: 0.90 * v for s, v in full.items()}
    assert claims.verdict_share(near, full, 0.99, True)["verdict"] == "holds"
    assert claims.verdict_share(far, full, 0.99, True)["verdict"] == "does not hold at this scale"
    assert claims.verdict_share(far, full, 0.99, True)["ratio"] == pytest.approx(0.90)


def test_share_of_full_for_a_loss_is_the_share_of_full_fine_tunings_gain_over_the_untrained_model():
    untrained = {0: 4.0}  # one untrained run: it stands for every seed
    full = {0: 2.0, 1: 2.1, 2: 1.9}
    half = {s: (4.0 + v) / 2 for s, v in full.items()}  # half of full's gain: a loss ratio would say ~67%
    v = claims.verdict_share(half, full, 0.99, False, untrained)
    assert v["ratio"] == pytest.approx(0.5) and v["verdict"] == "does not hold at this scale"
    near = {s: v - 0.001 for s, v in full.items()}  # a little better than full
    assert claims.verdict_share(near, full, 0.99, False, untrained)["verdict"] == "holds"
    assert claims.verdict_share(near, full, 0.99, False, None)["verdict"] == "not run yet"


def test_every_claim_names_entries_of_its_task(tmp_path, monkeypatch):
    """Every claim is judged on every task, with a task's own entries where it has them (chat: PiCa r = 150
    against LoRA r = 2, SmolLM2's matched pair), and no claim is silently dropped for want of an entry."""
    pytest.importorskip("subpeft.app.compare")
    monkeypatch.setattr(claims, "OUT", tmp_path)  # no runs: every claim "not run yet"
    for task in claims.TASKS:
        judged = {c["id"]: c for c in claims.judge(task, [])}
        assert set(judged) == {c["id"] for c in claims.CLAIMS}, task
        assert all(c["verdict"] == "not run yet" for c in judged.values())
    chat = {c["id"]: c for c in claims.judge("chat", [])}["pica_matched"]
    assert (chat["a"], chat["b"]) == ("pica r=150", "lora r=2")
    assert {c["id"]: c for c in claims.judge("tweets", [])}["pica_matched"]["a"] == "pica r=96"


def test_converge_trains_full_longer_at_its_chosen_lr_and_reports_the_curve(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "OUT", tmp_path / "claims")
    monkeypatch.setattr(claims, "ROOT", tmp_path)
    runs = []
    monkeypatch.setattr(claims, "load_runs", lambda task: runs)
    assert claims.converge_command("tweets") is None  # no full fine-tuning run yet
    runs += [{"label": "full", "seed": 1, "lr": 1e-4, "test": {"accuracy": 0.70}},
             {"label": "full", "seed": 0, "lr": 3e-4, "test": {"accuracy": 0.75}}]
    cmd = claims.converge_command("tweets")
    steps = int(claims._common_value("tweets", "--max-steps"))
    assert cmd[cmd.index("--max-steps") + 1] == str(steps * claims.CONVERGE_FACTOR)
    assert cmd[cmd.index("--lr") + 1] == "0.0003" and cmd[cmd.index("--method") + 1] == "full"
    assert claims.converge_result("tweets", runs) is None
    out = tmp_path / "claims" / "tweets" / "converge"
    out.mkdir(parents=True)
    history = [{"step": s, "accuracy": a} for s, a in ((100, 0.6), (200, 0.7), (300, 0.74), (400, 0.76))]
    (out / "metrics.json").write_text(json.dumps({"metric": "accuracy", "steps": 600, "lr": 3e-4,
                                                   "dev": {"history": history}, "test": {"accuracy": 0.77}}))
    c = claims.converge_result("tweets", runs)
    assert c["dev_curve"][-1] == (400, 0.76) and c["test"] == 0.77 and c["test_at_part_steps"] == 0.75
    assert "step 400: 0.7600" in claims.converge_line(c) and "(the 300-step run above: 0.7500)" in claims.converge_line(c)


def test_summary_table_is_claims_by_tasks_with_the_deciding_numbers():
    b = {0: 0.70, 1: 0.72, 2: 0.74}
    better = claims.verdict_better({s: v + 0.02 for s, v in b.items()}, b, True, 0.005)
    loss = claims.verdict_better({0: 1.0, 1: 1.1, 2: 1.2}, {0: 1.1, 1: 1.2, 2: 1.3}, False, 0.01)
    rows = [{**claims.CLAIMS[0], "task": "tweets", **better}, {**claims.CLAIMS[0], "task": "chat", **loss}]
    table = claims.summary_table(rows)
    assert table[0] == "| claim | " + " | ".join(claims.TASKS) + " |"
    row = next(line for line in table if line.startswith(f"| {claims.CLAIMS[0]['claim']} |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    by_task = dict(zip(claims.TASKS, cells, strict=True))
    assert by_task["tweets"] == "holds: +0.020 [+0.020, +0.020]"
    assert by_task["chat"] == "holds: +0.100 [+0.100, +0.100]"  # a lower loss is the better side
    assert by_task["reviews"] == "not planned"
    assert len(table) == 3  # claims without any cell are left out


def test_a_task_with_only_lr_search_runs_gets_no_plot_and_no_error(tmp_path):
    pytest.importorskip("matplotlib")
    assert claims.plot_task("chat", [], None, tmp_path / "chat.png") is False
    assert not (tmp_path / "chat.png").exists()
    run = {"label": "lora r=2", "seed": 0, "metric": "answer_loss", "greater_is_better": False,
           "test": {"answer_loss": 2.5}}
    assert claims.plot_task("chat", [run], None, tmp_path / "chat.png") and (tmp_path / "chat.png").is_file()


def test_a_task_rows_difference_is_a_minus_b_in_the_metric_and_says_so_for_a_loss():
    """The per-task table shows the means and their raw difference a − b (a loss: negative is the better side);
    the summary shows the same claim better-positive."""
    a, b = {0: 1.0, 1: 1.1, 2: 1.2}, {0: 1.1, 1: 1.2, 2: 1.3}
    loss = claims.verdict_better(a, b, False, 0.01)
    c = {**claims.CLAIMS[0], "a_mean": 1.1, "a_std": 0.1, "b_mean": 1.2, "b_std": 0.1, "a_seeds": 3, "b_seeds": 3,
         **loss}
    row = claims.claim_row(c)
    assert "paired difference -0.1000 [-0.1000, -0.1000]" in row and "lower is better here" in row
    acc = claims.verdict_better(b, a, True, 0.005)
    row = claims.claim_row({**c, **acc})
    assert "paired difference +0.1000 [0.1000, 0.1000]" in row and "lower is better" not in row


def test_a_verdict_from_fewer_seeds_than_planned_is_marked_provisional(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "OUT", tmp_path)

    def runs(seeds_a, seeds_b):
        out = []
        for label, seeds, base in (("lora r=2 mpc=o", seeds_a, 2.50), ("lora r=2", seeds_b, 2.40)):
            out += [{"label": label, "seed": s, "metric": "answer_loss", "greater_is_better": False,
                     "test": {"answer_loss": base + 0.01 * s}} for s in range(seeds)]
        return out

    def mpc_mean(r):
        return {c["id"]: c for c in claims.judge("chat", r)}["mpc_o"]

    part = mpc_mean(runs(4, 5))  # the mpc part plans 5 seeds: one of MPC_o's is still to run
    assert part["verdict"] == "does not hold at this scale" and part["provisional"]
    assert "**does not hold at this scale** (provisional: 4 of 5 seeds)" in claims.claim_row(part)
    assert claims.short_cell(part).startswith("does not hold at this scale (provisional, 4 of 5 seeds): -0.100")
    done = mpc_mean(runs(5, 5))
    assert not done["provisional"] and "provisional" not in claims.claim_row(done) + claims.short_cell(done)
    assert mpc_mean(runs(2, 5))["verdict"] == "not run yet" and not mpc_mean(runs(2, 5))["provisional"]
    # LoRA-Dash r = 2 (3 seeds planned) against LoRA r = 2 (the mpc part's, 5): final once both have 3
    dash = [{"label": label, "seed": s, "metric": "answer_loss", "greater_is_better": False,
             "test": {"answer_loss": 2.4 + 0.01 * s}} for label, n in (("lora_dash r=2", 3), ("lora r=2", 4))
            for s in range(n)]
    assert not {c["id"]: c for c in claims.judge("chat", dash)}["dash_r2"]["provisional"]
