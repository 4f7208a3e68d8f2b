"""Smoke test of ``benchmarks/method_matrix.py`` on a tiny random BERT (no MiniLM, no timing assertions).

The real property checked: the explicitly matched configurations give subpeft and peft adapters with
the same number of trainable parameters, for every method both libraries have (at the default
query/value targets and at every encoder linear). The measuring core (interleaved timing, merged and
unmerged inference, the RSS-based memory measurement) runs once on two methods.
"""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import method_matrix as mm  # noqa: E402

PAIRS = sorted(mm.peft_pairs())
PAIRS_ALL_LINEAR = sorted(mm.peft_pairs(all_linear=True))


@pytest.fixture(scope="module")
def base():
    model = mm.tiny_base(0)
    model.eval()
    return model


@pytest.mark.parametrize("all_linear", [False, True])
def test_every_peft_method_is_matched(all_linear):
    names = PAIRS_ALL_LINEAR if all_linear else PAIRS
    expected = {"lora", "dora", "adalora", "vera"} | (
        set() if all_linear else {"ia3", "layernorm", "prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2"}
    )
    assert set(names) == expected


@pytest.mark.parametrize(("method", "all_linear"), [(m, False) for m in PAIRS] + [(m, True) for m in PAIRS_ALL_LINEAR])
def test_matched_configs_train_the_same_number_of_parameters(base, method, all_linear):
    sp_c, peft_c = mm.peft_pairs(all_linear=all_linear)[method]
    assert (sp_c.lib, peft_c.lib) == ("subpeft", "peft")
    n_sp, n_peft = mm.n_trainable(sp_c.build(base)), mm.n_trainable(peft_c.build(base))
    assert n_sp > 0
    assert n_sp == n_peft, f"{method}: subpeft trains {n_sp}, peft {n_peft}"


def test_group_core_runs_on_two_methods(base):
    pairs = mm.peft_pairs()
    group = {"contenders": [*pairs["lora"], *pairs["ia3"]], "refs": {}}
    ids, mask, labels = mm.make_inputs(base.config.vocab_size, batch=2, seq=8)
    res = mm.run_group_time(group, base, ids, mask, labels, warmup=1, reps=2, reps_infer=2, log=False)
    assert res["failed"] == {}
    assert set(res["train"]) == {"subpeft lora", "peft lora", "subpeft ia3", "peft ia3"}
    assert {"base model", "subpeft lora unmerged", "subpeft lora merged", "subpeft ia3 merged"} <= set(res["inference"])
    assert all(s["n"] == 2 for s in res["train"].values())
    # merging changes nothing (float32 rounding only)
    assert res["checks"]["subpeft lora: max |merged - unmerged| logits"] < 1e-4
    assert res["checks"]["subpeft ia3: max |merged - unmerged| logits"] < 1e-4
    if os.path.exists("/proc/self/clear_refs"):
        res["memory"] = {c.name: mm.measure_memory(c, base, ids, mask, labels, warmup=1, repeats=1)
                         for c in group["contenders"]}
        assert all(m["total_mib"] >= 0 for m in res["memory"].values())
    rows = mm.evaluate("smoke", group, res)
    kinds = {r["kind"] for r in rows}
    assert {"train: subpeft / peft", "infer: merged / base"} <= kinds
    assert all(r["status"] in ("met", "missed", "") for r in rows)
    assert all(r["params_match"] for r in rows if "params_match" in r)
