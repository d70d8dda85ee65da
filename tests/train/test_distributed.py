"""Data parallelism on CPU with gloo: 2 ranks x batch b train exactly as 1 process x batch 2b; failures.

One job of 2 spawned ranks (one thread each) runs every scenario below in turn (last: ranks that disagree,
then a rank that dies); the 1-process references run in the test process. Tolerance: rtol 1e-5 (fp32; the
two differ only in the order of the sums: one batch of 2b rows against two of b rows added by the
all-reduce). LoRA dropout is 0: its masks are drawn per rank and
depend on how the batch is split (docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlorakit.cli.main import main
from qlorakit.data import build_datasets, collate_fn
from qlorakit.train import read_metrics, train
from tests.helpers.distributed import (
    Scenario,
    assert_close_rows,
    copy_until,
    final_adapter,
    metric_rows,
    read_report,
    run_ranks,
    small_oasst_file,
)
from tests.helpers.tiny_llama import save_tiny_llama
from tests.helpers.train import run_config, tiny_qlora_model

RTOL = 1e-5
#: Adapter entries also get ``ATOL``: AdamW divides by sqrt(v), so the fp32 rounding of a near-zero gradient
#: entry shows in its update at the scale of lr (1e-2 here), not of the entry; 1e-5 is 1e-3 of one update.
ATOL = 1e-5
#: scenario -> (grad_accum, optimizer, steps); 10 train examples in micro-batches of 4: every epoch ends with a
#: micro-batch of 2, all of it on rank 0 (rank 1's share is empty).
SCENARIOS = {"plain": (1, "adamw", 3), "accum8bit": (2, "adamw8bit", 3)}
RESUMED = "accum8bit"  # saves at step 2; resumed 1 -> 2 and 2 -> 1 ranks


def _cfg(data: Path, out: Path, grad_accum: int, optim: str, steps: int):
    cfg = run_config(data, out, batch_size=4, grad_accum=grad_accum, optim=optim, max_steps=steps, save_steps=2,
                     save_total_limit=0)
    return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.0),
                               parallel=dataclasses.replace(cfg.parallel, dist_timeout_s=60))


def _one_process(cfg, sets, vocab, resume: Path | None = None):
    train_set, val_set, collate = sets
    model = tiny_qlora_model(vocab, cfg.lora, seed=0)
    train(model, train_set, val_set, collate, cfg, Path(cfg.train.output_dir), resume, progress=False)


def _cli_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--batch-size", "4",
            "--grad-accum", "1", "--lora-r", "4", "--lora-dropout", "0", "--val-size", "4", "--compute-dtype",
            "float32", "--no-progress", "--source-max-len", "64", "--target-max-len", "32", "--lr", "1e-2",
            "--no-gradient-checkpointing", "--max-steps", "2", "--dist-timeout-s", "60"]


def _pairs_file(path: Path) -> Path:
    """7 prompts x 2 preference pairs (the chosen answer is the polite one): 10 train / 4 held-out pairs."""
    rows = [{"prompt": f"Tell me one fact about {topic}.", "chosen": f"Sure! A fact about {topic}: it is nice {i}.",
             "rejected": rude}
            for i, topic in enumerate(["cats", "tea", "rain", "maps", "bread", "chess", "boats"])
            for rude in ("No.", "Go away.")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _preference_args(model: Path, data: Path, out: Path, method: str) -> list[str]:
    """A DPO / ORPO run with accumulation: 10 pairs in micro-batches of 4 pairs, so an epoch's last one has 2."""
    args = _cli_args(model, data, out) + ["--method", method, "--grad-accum", "2", "--max-steps", "3"]
    return args


PREFERENCE = ("dpo", "orpo")


@pytest.fixture(scope="module")
def job(smol_tokenizer, shared_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = small_oasst_file(shared_dir, root / "small.jsonl")
    cfgs = {name: _cfg(data, root / f"{name}-1", *spec) for name, spec in SCENARIOS.items()}
    train_set, val_set, _ = build_datasets(cfgs["plain"].data, smol_tokenizer)
    sets, vocab = (train_set, val_set, collate_fn(smol_tokenizer)), len(smol_tokenizer)
    for cfg in cfgs.values():
        _one_process(cfg, sets, vocab)
    two = {name: dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(root / f"{name}-2")))
           for name, cfg in cfgs.items()}
    scenarios = [Scenario(name, cfg) for name, cfg in two.items()]
    resumed_12 = copy_until(root / f"{RESUMED}-1", root / "resume-1to2", 2)
    cfg_12 = dataclasses.replace(two[RESUMED], train=dataclasses.replace(two[RESUMED].train,
                                                                          output_dir=str(resumed_12.parent)))
    scenarios.append(Scenario("resume-1to2", cfg_12, resume_from=str(resumed_12)))
    plain = two["plain"]
    model_dir = save_tiny_llama(root / "tiny", smol_tokenizer, vocab_size=vocab, tie_word_embeddings=True)
    assert main(_cli_args(model_dir, data, root / "cli-1")) == 0
    scenarios.append(Scenario("cli", plain, cli_args=_cli_args(model_dir, data, root / "cli-2")))
    pairs = _pairs_file(root / "pairs.jsonl")
    for method in PREFERENCE:  # DPO / ORPO: the mean over the global step's pairs, metrics summed over ranks
        assert main(_preference_args(model_dir, pairs, root / f"{method}-1", method)) == 0
        scenarios.append(Scenario(method, plain, cli_args=_preference_args(model_dir, pairs, root / f"{method}-2",
                                                                           method)))
        scenarios.append(Scenario(f"{method}-fsdp", plain, cli_args=_preference_args(  # the same run under FSDP
            model_dir, pairs, root / f"{method}-fsdp", method) + ["--distributed", "fsdp"]))
    # LoRA dropout on: each rank draws its own masks; a resume on 2 ranks continues them exactly
    dropout = dataclasses.replace(plain, lora=dataclasses.replace(plain.lora, dropout=0.1),
                                  train=dataclasses.replace(plain.train, output_dir=str(root / "dropout")))
    scenarios.append(Scenario("dropout", dropout))
    scenarios.append(Scenario("dropout-resumed", dropout, resume_from=str(root / "dropout" / "checkpoint-2")))
    # rank 1 gets SIGTERM at its first forward pass (held-out loss at step 0): both ranks stop after step 1
    scenarios.append(Scenario("sigterm", dataclasses.replace(plain, train=dataclasses.replace(
        plain.train, output_dir=str(root / "sigterm"))), sigterm_on_rank=1))
    scenarios.append(Scenario("mismatch", dataclasses.replace(plain, train=dataclasses.replace(
        plain.train, output_dir=str(root / "mismatch"))), rank_overrides={1: {"lr": 2e-2}}))
    # rank 1 dies at its 3rd forward pass: the held-out batch at step 0, step 2, step 3 (step 1 is all rank 0's)
    scenarios.append(Scenario("dead", dataclasses.replace(plain, train=dataclasses.replace(
        plain.train, output_dir=str(root / "dead"))), die_on_rank=1, die_at_forward=3))
    out = root / "reports"
    out.mkdir()
    codes = run_ranks(2, (scenarios, train_set, val_set, sets[2], vocab, str(out)), timeout_s=300)
    assert codes == [0, 3], [read_report(out, s.name, r) for s in scenarios for r in (0, 1)]  # 3: the dead rank
    resumed_21 = copy_until(root / f"{RESUMED}-2", root / "resume-2to1", 2)
    cfg_21 = dataclasses.replace(cfgs[RESUMED], train=dataclasses.replace(cfgs[RESUMED].train,
                                                                           output_dir=str(resumed_21.parent)))
    _one_process(cfg_21, sets, vocab, resume=resumed_21)
    return root, out, codes


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_give_the_losses_grad_norms_and_adapter_of_one_process(job, name):
    root, out, _ = job
    one, two = root / f"{name}-1", root / f"{name}-2"
    for key in ("loss", "grad_norm", "eval_loss"):
        assert_close_rows(metric_rows(two, key), metric_rows(one, key), RTOL)
    a, b = final_adapter(one), final_adapter(two)
    assert a.keys() == b.keys() and len(a) == 28
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL)
    assert max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k) > 1e-3  # the adapters did move


def test_the_replicas_stay_identical_and_rank_0_alone_writes_the_run(job):
    root, out, _ = job
    for name in SCENARIOS:
        r0, r1 = load_file(str(out / f"{name}.rank0.safetensors")), load_file(str(out / f"{name}.rank1.safetensors"))
        assert all(torch.equal(r0[k], r1[k]) for k in r0)  # rank 1 started from other random adapters: broadcast
        assert len(read_report(out, name, 0)["rank_peak_rss_mb"]) == 2
    rows = [r for r in read_metrics(root / "plain-2" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(len(r["rank_peak_rss_mb"]) == 2 for r in rows)  # one row per step: one writer
    assert sorted(p.name for p in (root / "plain-2").iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-2", "checkpoint-3"]


@pytest.mark.parametrize("resumed", ["resume-1to2", "resume-2to1"])
def test_resume_across_world_sizes_continues_the_uninterrupted_losses(job, resumed):
    root, _, _ = job
    want = metric_rows(root / f"{RESUMED}-1", "loss")
    got = metric_rows(root / resumed, "loss")
    assert [s for s, _ in got] == [1, 2, 3]  # steps 1-2 kept from the stopped run, 3 trained after the resume
    assert_close_rows(got, want, RTOL)
    a, b = final_adapter(root / f"{RESUMED}-1"), final_adapter(root / resumed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL)


def test_ranks_that_disagree_are_refused_before_any_step(job):
    root, out, _ = job
    for rank in (0, 1):  # every rank refuses
        report = read_report(out, "mismatch", rank)
        assert report["type"] == "DistributedError", report
        assert "rank(s) [1] have a config or training data different from rank 0's" in report["error"]
    assert not (root / "mismatch" / "metrics.jsonl").exists()


def test_a_dead_rank_stops_the_others_with_a_clear_error(job):
    root, out, codes = job
    assert codes[1] == 3  # rank 1 died (os._exit(3)) in step 3 ...
    assert codes[0] == 0  # ... and rank 0 did not hang: it stopped with an error (the worker reports it, exits 0)
    survivor = read_report(out, "dead", 0)
    assert survivor["type"] == "DistributedError", survivor
    assert "Another rank has most likely died or hung" in survivor["error"] and "--resume" in survivor["error"]
    assert [r["step"] for r in read_metrics(root / "dead" / "metrics.jsonl") if "loss" in r] == [1, 2]


def test_qlorakit_train_on_two_ranks_writes_the_run_of_one_process(job):
    root, out, _ = job
    assert read_report(out, "cli", 0)["ok"] and read_report(out, "cli", 1)["ok"]
    one, two = root / "cli-1", root / "cli-2"
    assert_close_rows(metric_rows(two, "loss"), metric_rows(one, "loss"), RTOL)
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}  # adapter, plot, config, checkpoint
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", PREFERENCE)
def test_preference_tuning_on_two_ranks_gives_the_losses_rewards_and_adapter_of_one_process(job, method, strategy):
    root, out, _ = job
    name = method if strategy == "ddp" else f"{method}-fsdp"
    assert read_report(out, name, 0)["ok"] and read_report(out, name, 1)["ok"]
    one, two = root / f"{method}-1", root / (f"{method}-2" if strategy == "ddp" else name)
    keys = ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "rewards/accuracies", "eval_loss",
            "eval_rewards/margins")
    for key in keys:
        want, got = metric_rows(one, key), metric_rows(two, key)
        assert want, key
        if not key.endswith("margins"):
            assert_close_rows(got, want, RTOL)
            continue
        # chosen - rejected rewards: ORPO's are about -1.07 and differ by 0.004, so their fp32 rounding (1e-7 of a
        # reward) is up to 3e-5 of the margin; held to rtol 1e-5 of the rewards themselves
        scale = max(abs(v) for _, v in metric_rows(one, key.replace("margins", "chosen")))
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=RTOL, abs=RTOL * scale), key
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL)


def test_a_stop_signal_on_one_rank_stops_every_rank_after_the_same_step_with_a_checkpoint(job):
    root, out, _ = job
    for rank in (0, 1):  # rank 0 got no signal: it learns of rank 1's in the step's all-reduce
        report = read_report(out, "sigterm", rank)
        assert report["ok"] and report["stopped_by"] == "SIGTERM" and report["steps"] == 1, report
    assert [p.name for p in (root / "sigterm").iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-1"]


def test_with_dropout_each_rank_draws_its_own_masks_and_a_resume_continues_them_exactly(job):
    root, out, _ = job
    rng = load_file(str(root / "dropout" / "checkpoint-2" / "rng.safetensors"))
    assert not torch.equal(rng["torch_cpu"], rng["torch_cpu.rank1"])  # two streams, both saved
    full, resumed = read_report(out, "dropout", 0), read_report(out, "dropout-resumed", 0)
    assert resumed["losses"] == full["losses"][2:]  # step 3 again, from checkpoint-2: bit-identical on CPU
    for rank in (0, 1):
        a = load_file(str(out / f"dropout.rank{rank}.safetensors"))
        b = load_file(str(out / f"dropout-resumed.rank{rank}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
