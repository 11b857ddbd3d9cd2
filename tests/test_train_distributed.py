"""Multi-process training on 2 CPU ranks (gloo), all from one set of launches (`tests.fixtures_train.dist_runs`).

* gathered contrastive loss equals the single-process loss over the concatenated batch, gradients too;
* ZeRO stages 0-3 match a single process on the same global batch;
* ZeRO-3 trains when one rank never sees audio;
* preemption (SIGUSR1 on one rank under the deepspeed launcher) saves on every rank and exits with the preemption
  code; resuming with ``train.resume=auto`` reproduces the uninterrupted losses and sample keys (fp32, dropout on)
  and continues the same MLflow run; a crashed run ends FAILED. MLflow is read back through `MlflowClient`.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from mmt.config.preemption import PREEMPTED_EXIT_CODE
from mmt.training.preemption import exited_due_to_preemption
from tests.fixtures_train import (
    ACCUM_STEPS,
    EVAL_RUNS,
    EVAL_SAMPLES,
    ZERO_SAVE,
    ZERO_STEPS,
    all_train_rows,
    consumed_keys,
    eval_row,
    final_weights,
    global_keys,
    key_records,
    train_rows,
)
from tests.fixtures_train import RESUME_STEPS as STEPS

WEIGHT_ATOL = 5e-6

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def runs(dist_runs):
    return dist_runs


def test_contrastive_loss_gathered_over_two_ranks_equals_concatenated_batch(runs):
    for rank in (0, 1):
        r = json.loads((runs["tmp"] / f"contrastive_rank{rank}.json").read_text())
        # fp32 on tiny matrices: summation order is the only difference
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
        assert r["local_feature_grads_match"]
        assert r["max_param_grad_diff"] <= 1e-6 * max(1.0, r["max_param_grad"])


def test_teardown_leaves_no_gloo_threads(runs):
    # After 2-rank ZeRO 0-3 trainings and the teardown, every gloo group is freed and its threads joined (a live
    # group's threads met at interpreter shutdown can abort the worker at exit).
    for rank in (0, 1):
        threads = json.loads((runs["tmp"] / f"exit_threads_rank{rank}.json").read_text())
        assert threads and not [t for t in threads if "gloo" in t], threads


def assert_rows_match(got: dict, ref: dict, steps) -> None:
    for step in steps:
        # Same global batch and init: 2 ranks change only the order of fp32 reductions (ZeRO-3 also reduce-
        # scatters). Measured: <= 1e-6 relative on the loss, <= 1e-5 on the gradient norm.
        assert got[step]["train/loss"] == pytest.approx(ref[step]["train/loss"], rel=1e-5), step
        assert got[step]["train/grad_norm"] == pytest.approx(ref[step]["train/grad_norm"], rel=5e-5), step
        if "train/logit_scale" in ref[step]:  # retrieval's temperature
            assert got[step]["train/logit_scale"] == pytest.approx(ref[step]["train/logit_scale"], rel=1e-5)
        assert got[step]["train/lr"] == pytest.approx(ref[step]["train/lr"], rel=1e-12), step


def assert_weights_match(got: dict, ref: dict) -> None:
    assert set(got) == set(ref)
    for k in ref:
        # fp32 reduction order only, over ZERO_STEPS Adam updates of <= lr = 1e-3 each: measured max abs diff
        # 5e-7 (weights up to 2.7); a missing or repeated update moves weights by ~1e-4..1e-3.
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=WEIGHT_ATOL, msg=k)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_matches_single_process(runs, stage):
    tmp = runs["tmp"]
    ref, got = train_rows(tmp / "ref"), train_rows(tmp / f"zero{stage}")
    assert sorted(got) == sorted(ref) == list(range(1, ZERO_STEPS + 1))
    assert all(ref[s]["train/lr"] > 0 for s in ref)  # every step is a real update
    assert_rows_match(got, ref, ref)
    # the same global batches, and the same final weights
    assert global_keys(tmp / f"zero{stage}", 2) == global_keys(tmp / "ref", 1)
    assert_weights_match(final_weights(tmp / f"zero{stage}"), final_weights(tmp / "ref"))
    # Training moved the weights: the losses are not all equal.
    assert len({round(ref[s]["train/loss"], 6) for s in ref}) > 1


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_another_world_size_continues_the_run(runs, stage, world_size):
    """Saved on 2 ranks at step ZERO_SAVE, resumed by `train` on 1 or 3: converted to a universal checkpoint once
    (one line says so), then the same global sample sequence, losses and final weights as the 2-rank run."""
    tmp = runs["tmp"]
    ref_dir, run_dir = tmp / f"zero{stage}", tmp / f"zero{stage}_ws{world_size}"
    saved = ref_dir / f"checkpoints/step_{ZERO_SAVE:08d}"
    lines = (tmp / f"ws{world_size}/output.txt").read_text().splitlines()
    converted = [x for x in lines if "universal checkpoint rank 0 converted" in x and f"resume {saved} " in x]
    assert len(converted) == 1, converted
    assert f"saved on 2 ranks (ZeRO-{stage}), loading on {world_size} rank" in converted[0]
    assert not (run_dir / ".resume-universal").exists()  # the universal copy is gone once loaded
    steps = list(range(ZERO_SAVE + 1, ZERO_STEPS + 1))
    assert [r["step"] for r in all_train_rows(run_dir)] == steps
    ref_keys, got_keys = global_keys(ref_dir, 2), global_keys(run_dir, world_size)
    assert got_keys == {s - 1: ref_keys[s - 1] for s in steps}  # keys are recorded under the 0-based step
    assert_rows_match(train_rows(run_dir), train_rows(ref_dir), steps)
    final = final_weights(run_dir)
    assert_weights_match(final, final_weights(ref_dir))
    start = final_weights(ref_dir, f"step_{ZERO_SAVE:08d}")
    assert (
        max(float((final[k] - start[k]).detach().abs().max()) for k in start) > 100 * WEIGHT_ATOL
    )  # real updates


def test_grad_accumulation_4x8_equals_1x32(runs):
    """VQA (a per-sample mean loss), ZeRO-2, 2 ranks: 4 micro batches of 8 per rank, with activation
    checkpointing, against one batch of 32 per rank: the same losses, gradient norms and final weights."""
    tmp = runs["tmp"]
    ref, got = train_rows(tmp / "vqa_whole"), train_rows(tmp / "vqa_accum")
    assert sorted(got) == sorted(ref) == list(range(1, ACCUM_STEPS + 1))
    assert_rows_match(got, ref, ref)
    assert_weights_match(final_weights(tmp / "vqa_accum"), final_weights(tmp / "vqa_whole"))
    ds = json.loads((tmp / "vqa_accum/ds_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 8


@pytest.mark.parametrize("run", EVAL_RUNS)
def test_evaluation_on_two_ranks_equals_one_rank(runs, run):
    """The same checkpoint evaluated on 1 and 2 ranks (`mmt eval`), and by the trainer on 2 ranks at the end:
    9 held-out samples split 5 / 4 in batches of 4, so rank 1 runs out first and its results must be gathered
    and de-duplicated exactly once. Retrieval recall, VQA accuracy, captioning BLEU-4 / loss / perplexity."""
    run_dir = runs["tmp"] / run
    one = json.loads((run_dir / "eval_ws1.json").read_text())
    two = json.loads((run_dir / "eval_ws2.json").read_text())
    trainer = eval_row(run_dir)
    names = sorted(k for k in one if k.startswith("val/"))
    assert (
        names
        == sorted(k for k in two if k.startswith("val/"))
        == sorted(k for k in trainer if k.startswith("val/"))
    )
    assert one["val/samples"] == two["val/samples"] == trainer["val/samples"] == EVAL_SAMPLES
    for k in names:
        # Counts of hits (recall, accuracy, BLEU n-grams) are exact; losses are fp32 sums in another order.
        exact = not k.endswith(("loss", "perplexity"))
        for other in (two, trainer):
            assert other[k] == (one[k] if exact else pytest.approx(one[k], rel=1e-5)), (k, other[k], one[k])
    key = {"zero2": "val/recall_at_1", "vqa_accum": "val/vqa_accuracy", "cap": "val/bleu4"}[run]
    assert key in names


def test_bf16_and_offload_ran_through_the_trainer(runs):
    tmp = runs["tmp"]
    ds = json.loads((tmp / "mixed/ds_config.json").read_text())
    assert ds["bf16"]["enabled"] is True
    ds = json.loads((tmp / "zero1/ds_config.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_zero3_rank_without_audio_trains(runs):
    run_dir = runs["tmp"] / "mixed"
    rows = train_rows(run_dir)
    assert sorted(rows) == [1, 2, 3, 4]
    assert all(math.isfinite(r["train/loss"]) for r in rows.values())
    # rank 1 really never had audio (samples 8b+4..8b+7), rank 0 always did, and the text-audio loss was used
    rank1 = [int(k[-6:]) for keys in consumed_keys(run_dir, 1).values() for k in keys]
    rank0 = [int(k[-6:]) for keys in consumed_keys(run_dir, 0).values() for k in keys]
    assert rank1 and all(i % 8 >= 4 for i in rank1)
    assert rank0 and all(i % 8 < 4 for i in rank0)
    assert all("train/loss_text_audio" in r for r in rows.values())
    assert runs["results"][str(runs["configs"]["mixed"])]["exit_code"] == 0


def test_preemption_stops_every_rank_saves_and_exits_with_the_preemption_code(runs):
    p = runs["preempted"]
    assert p["exit_code"] == PREEMPTED_EXIT_CODE, p["output"][-3000:]
    info = p["info"]
    assert info is not None and info["signal"] == "SIGUSR1"
    k = info["step"]
    assert 2 <= k < STEPS
    assert p["flag"] and p["latest"] == f"step_{k:08d}"
    meta = p["meta"]
    assert meta["complete"] is True and meta["step"] == k and meta["world_size"] == 2
    assert max(p["rows"]) == k  # no rank trained past the step it saved
    # the marker is gone once the resumed run finished normally
    assert not exited_due_to_preemption(0, runs["tmp"] / "pre")


def test_resumed_run_reproduces_the_uninterrupted_losses_and_samples(runs):
    tmp = runs["tmp"]
    ref, got = train_rows(tmp / "resume_ref"), train_rows(tmp / "pre")
    # The full record, in the order written by the preempted and the resumed run: every step exactly once.
    assert [r["step"] for r in all_train_rows(tmp / "pre")] == list(range(1, STEPS + 1))
    assert [r["step"] for r in all_train_rows(tmp / "resume_ref")] == list(range(1, STEPS + 1))
    for s in ref:
        # same world size, fp32, every RNG and the loader position restored: identical up to float printing
        assert got[s]["train/loss"] == pytest.approx(ref[s]["train/loss"], rel=1e-6, abs=1e-7), s
        assert got[s]["train/lr"] == pytest.approx(ref[s]["train/lr"], rel=1e-9), s
    for rank in (0, 1):
        records = key_records(tmp / "pre", rank)
        assert [s for s, _ in records] == list(range(STEPS))  # recorded under the 0-based step, each once
        assert records == key_records(tmp / "resume_ref", rank)
    # keep_last=2: only the two newest complete checkpoints survive, and `latest` names the newest
    tags = sorted(d.name for d in (tmp / "pre/checkpoints").iterdir() if d.is_dir())
    assert tags == [f"step_{STEPS - 2:08d}", f"step_{STEPS:08d}"]
    assert (tmp / "pre/checkpoints/latest").read_text().strip() == f"step_{STEPS:08d}"


def test_mlflow_records_params_metrics_artifacts_and_continues_the_run(runs):
    tmp = runs["tmp"]
    client = MlflowClient(runs["uri"])
    exp = client.get_experiment_by_name("mmt-tests")
    by_name = {}
    for r in client.search_runs([exp.experiment_id]):
        by_name.setdefault(r.info.run_name, []).append(r)
    assert len(by_name["pre"]) == 1, "the resumed run must continue the preempted MLflow run"
    run_ = by_name["pre"][0]
    meta = json.loads((tmp / f"pre/checkpoints/step_{STEPS:08d}/mmt_meta.json").read_text())
    assert meta["mlflow_run_id"] == run_.info.run_id
    assert run_.info.status == "FINISHED"
    assert run_.data.params["model.dim"] == "64" and run_.data.params["train.zero_stage"] == "2"
    assert run_.data.params["train.max_steps"] == str(STEPS)
    tags = run_.data.tags
    assert tags["mmt.world_size"] == "2" and tags["mmt.launcher"] in ("torchrun", "deepspeed")
    assert tags["mmt.run_dir"] == str(tmp / "pre") and tags["mmt.preempted_at_step"]
    assert "mmt.git_commit" in tags and "mmt.torch_version" in tags and "mmt.hostnames" in tags
    history = client.get_metric_history(run_.info.run_id, "train/loss")
    assert {m.step for m in history} == set(range(1, STEPS + 1))
    ref_loss = {s: r["train/loss"] for s, r in train_rows(tmp / "resume_ref").items()}
    assert all(m.value == pytest.approx(ref_loss[m.step], rel=1e-6) for m in history)
    for key in (
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
        "train/tokens_per_s",
        "node0/cpu_percent",  # both ranks on one node: their figures summed under node0
        "node0/rss_gb",
        "node0/data_fetched_gb",
        "node0/data_cache_hit_rate",
    ):
        assert client.get_metric_history(run_.info.run_id, key), key
    # Data wait: the share of step time blocked on the loader, in MLflow and metrics.jsonl on every log line.
    waits = client.get_metric_history(run_.info.run_id, "train/data_wait_frac")
    assert {m.step for m in waits} == set(range(1, STEPS + 1))
    assert all(0.0 <= m.value <= 1.0 for m in waits)
    rows = train_rows(tmp / "pre")
    assert rows and all(0.0 <= r["train/data_wait_frac"] <= 1.0 for r in rows.values())
    artifacts = {a.path for a in client.list_artifacts(run_.info.run_id)}
    assert {"config.yaml", "ds_config.json", "final_metrics.json"} <= artifacts
    final = json.loads(
        open(client.download_artifacts(run_.info.run_id, "final_metrics.json", str(tmp))).read()
    )
    assert final["step"] == STEPS and final["mlflow_run_id"] == run_.info.run_id


def test_crashed_run_is_marked_failed(runs):
    results = runs["results"][str(runs["configs"]["crash"])]
    assert "exception" in results and "missing" in results["exception"]
    client = MlflowClient(runs["uri"])
    exp = client.get_experiment_by_name("mmt-tests")
    crashed = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "crash"]
    assert len(crashed) == 1 and crashed[0].info.status == "FAILED"
    assert client.get_metric_history(crashed[0].info.run_id, "train/loss")  # it did train before dying
