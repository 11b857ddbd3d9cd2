"""Training pieces that need no process group: batch arithmetic, ds_config merging, metrics against hand-worked
cases, losses against their formulas, schedule, parameter groups, inputs for missing modalities, checkpoint
discovery, preemption flag."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from mmt.ckpt.layout import META_FILE, complete_tags, resolve_tag_dir
from mmt.ckpt.manager import resume_point
from mmt.config import ConfigError, load_config
from mmt.config.preemption import PREEMPTED_EXIT_CODE, parse_signals
from mmt.config.train import ScheduleConfig, TrainConfig
from mmt.training.batching import resolve_batch
from mmt.training.engine import build_ds_config, merge_ds_config
from mmt.training.losses import caption_loss, clip_pair_loss, vqa_loss
from mmt.training.metrics import (
    corpus_bleu,
    recall_at_k,
    recall_chance,
    vqa_accuracy,
    vqa_accuracy_from_scores,
)
from mmt.training.optim import lr_lambda, no_decay_names
from mmt.training.preemption import PreemptionFlag, exited_due_to_preemption, write_marker
from mmt.training.telemetry import DataWaitClock, StepMeter
from tests.fixtures_train import TINY_TRI

# ---------------------------------------------------------------------------------------------------- config


def test_batch_arithmetic_derives_the_missing_setting():
    t = TrainConfig(global_batch=64, micro_batch=8, grad_accum=0)
    p = resolve_batch(t, 4)
    assert (p.global_batch, p.micro_batch, p.grad_accum) == (64, 8, 2)
    p = resolve_batch(TrainConfig(global_batch=64, micro_batch=0, grad_accum=4), 2)
    assert (p.micro_batch, p.grad_accum) == (8, 4)
    p = resolve_batch(TrainConfig(global_batch=0, micro_batch=8, grad_accum=3), 2)
    assert p.global_batch == 48
    p = resolve_batch(TrainConfig(global_batch=32, micro_batch=0, grad_accum=0), 2)
    assert (p.micro_batch, p.grad_accum) == (16, 1)


@pytest.mark.parametrize(
    ("g", "m", "a", "w", "needle"),
    [
        (30, 0, 0, 4, "not divisible by grad_accum=1 * world_size=4"),
        (64, 8, 0, 3, "not divisible by micro_batch=8 * world_size=3"),
        (64, 8, 2, 2, "global_batch=64 != micro_batch=8 * grad_accum=2 * world_size=2 (= 32)"),
        (64, 0, 16, 8, "not divisible by grad_accum=16 * world_size=8"),
    ],
)
def test_batch_arithmetic_errors_name_the_keys_and_world_size(g, m, a, w, needle):
    with pytest.raises(ConfigError) as e:
        resolve_batch(TrainConfig(global_batch=g, micro_batch=m, grad_accum=a), w, "run.yaml")
    assert needle in str(e.value) and "world size" in str(e.value) and "run.yaml" in str(e.value)
    assert e.value.key.startswith("train.")


def test_config_checks_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError, match="train.global_batch"):
        load_config(None, ["train.global_batch=0"])
    with pytest.raises(ConfigError, match="train.offload_params.*zero_stage=3"):
        load_config(None, ["train.zero_stage=2", "train.offload_params=true"])
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_config(None, ["train.zero_stage=4"])
    with pytest.raises(ConfigError, match="train.global_batch.*not a multiple"):
        load_config(None, ["train.global_batch=30", "train.micro_batch=8"])


def test_ds_config_is_generated_from_train_config():
    t = TrainConfig(
        global_batch=32,
        micro_batch=4,
        zero_stage=3,
        offload_optimizer=True,
        offload_params=True,
        precision="bf16",
        grad_clip=0.5,
    )
    ds = build_ds_config(t, resolve_batch(t, 4), torch.device("cpu"))
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.5
    # on CPU, torch's AdamW: no JIT-compiled DeepSpeed optimizer op
    assert ds["optimizer"]["params"]["torch_adam"] is True
    # ... in its fused form (no whole-size temporaries on ZeRO's flat partition)
    assert ds["optimizer"]["params"]["fused"] is True
    t16 = TrainConfig(precision="fp16", loss_scale=0, initial_scale_power=12)
    ds16 = build_ds_config(t16, resolve_batch(t16, 1), torch.device("cpu"))
    assert ds16["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 12,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }


def test_user_ds_config_merges_and_reports_conflicts():
    gen = {"train_batch_size": 32, "zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}
    user = {
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 1000},
        "train_batch_size": "auto",
        "bf16": {"enabled": False},
        "comms_logger": {"enabled": True},
    }
    with pytest.raises(ConfigError) as e:
        merge_ds_config(gen, user)
    msg = str(e.value)
    assert "zero_optimization.stage: mmt=2, user=3" in msg and "train.ds_config_override" in msg
    assert "train_batch_size" not in msg  # "auto" defers to mmt
    merged, conflicts = merge_ds_config(gen, user, user_wins=True)
    assert conflicts == ["zero_optimization.stage: mmt=2, user=3"]
    assert merged["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}
    assert merged["train_batch_size"] == 32 and merged["comms_logger"] == {"enabled": True}
    # equal values (1 vs 1.0) are no conflict
    merged, conflicts = merge_ds_config({"gradient_clipping": 1.0}, {"gradient_clipping": 1})
    assert conflicts == []


# ---------------------------------------------------------------------------------------------------- metrics


def test_recall_at_k_hand_case():
    # 3 queries, 3 gallery items; match = same index.
    sims_q = torch.eye(3)
    gallery = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1.0]])
    # q0: match 1.0 beats 0.9 -> rank 0; q1: match scores 0.1 < item0 (0) ? item0 0, item1 0.1, item2 0 -> rank 0;
    # q2: rank 0. Now break q1: gallery row 1 becomes [0.9, 0, 0] -> q1 sees all zeros: tie -> counted as a miss.
    r = recall_at_k(sims_q, gallery, ks=(1, 2, 3))
    assert r == {1: 1.0, 2: 1.0, 3: 1.0}
    gallery[1] = torch.tensor([0.9, 0.0, 0.0])
    r = recall_at_k(sims_q, gallery, ks=(1, 2, 3))
    # q1's match scores 0 and so do items 0 and 2: two non-matches tie with it -> rank 2
    assert r == {1: 2 / 3, 2: 2 / 3, 3: 1.0}
    # constant similarity never looks like chance
    assert recall_at_k(torch.ones(4, 2), torch.ones(4, 2), ks=(1,)) == {1: 0.0}


def test_recall_groups_count_duplicate_captions_as_matches():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # rows 0 and 1 are the same caption
    assert recall_at_k(q, g, ks=(1,)) == {1: 1 / 3}
    assert recall_at_k(q, g, ks=(1,), groups=torch.tensor([0, 0, 1])) == {1: 1.0}
    assert recall_chance(torch.tensor([0, 0, 1])) == pytest.approx((2 * 2 / 3 + 1 / 3) / 3)
    assert recall_chance(torch.arange(10), k=5) == pytest.approx(0.5)


def test_vqa_accuracy_hand_case():
    # min(1, matches / 3): 3 of 10 say "2" -> 1; 1 of 10 says "3" -> 1/3; nobody says "7" -> 0
    answers = [[2, 2, 2, 5, 5, 5, 5, 5, 5, 5], [3, 4, 4, 4, 4, 4, 4, 4, 4, 4], [1] * 10]
    assert vqa_accuracy([2, 3, 7], answers) == pytest.approx((1 + 1 / 3 + 0) / 3)
    scores = torch.tensor([[0, 0, 1.0, 0, 0, 1.0], [0, 0, 0, 1 / 3, 1.0, 0], [0, 1.0, 0, 0, 0, 0]])
    assert vqa_accuracy_from_scores(torch.tensor([2, 3, 0]), scores) == pytest.approx((1 + 1 / 3 + 0) / 3)


def test_bleu4_hand_cases():
    ref = "the cat sat on a mat".split()
    hyp = "the cat sat on the mat".split()
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths: no brevity penalty
    assert corpus_bleu([hyp], [[ref]]) == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    short = "the cat sat on".split()
    # every n-gram matches; 4 words against 6: brevity penalty exp(1 - 6/4)
    assert corpus_bleu([short], [[ref]]) == pytest.approx(math.exp(1 - 6 / 4))
    # corpus level: counts are summed before the precisions (9/10, 6/8, 4/6, 2/4) and lengths 10 vs 12
    assert corpus_bleu([hyp, short], [[ref], [ref]]) == pytest.approx(
        math.exp(1 - 12 / 10) * (9 / 10 * 6 / 8 * 4 / 6 * 2 / 4) ** 0.25
    )
    # the closest reference length counts (shorter wins ties); identical -> 1
    assert corpus_bleu([ref], [[ref, ref + ["extra"]]]) == pytest.approx(1.0)
    assert corpus_bleu([["a", "b"]], [[["c", "d"]]]) == 0.0


# ---------------------------------------------------------------------------------------------------- losses


def test_clip_pair_loss_matches_the_written_out_formula():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(3, 4), dim=-1), F.normalize(torch.randn(3, 4), dim=-1)
    s = torch.tensor(5.0)
    logits = s * a @ b.t()
    i2t = -sum(logits[i, i] - torch.logsumexp(logits[i], 0) for i in range(3)) / 3
    t2i = -sum(logits[i, i] - torch.logsumexp(logits[:, i], 0) for i in range(3)) / 3
    assert clip_pair_loss(a, b, s) == pytest.approx(float((i2t + t2i) / 2), rel=1e-6)


def test_vqa_loss_uses_normalised_soft_targets_and_skips_rows_without_answers():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    targets = torch.tensor([[1.0, 1 / 3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    logp = F.log_softmax(logits, -1)
    row0 = -(0.75 * logp[0, 0] + 0.25 * logp[0, 1])
    row1 = -logp[1, 1]
    assert vqa_loss(logits, targets) == pytest.approx(float((row0 + row1) / 2), rel=1e-6)


def test_caption_loss_predicts_the_next_token_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    ids = torch.tensor([[1, 5, 6, 2], [1, 4, 2, 0]])
    mask = ids != 0
    loss, nll = caption_loss(logits, ids, mask, label_smoothing=0.0)
    pairs = [(0, 0, 5), (0, 1, 6), (0, 2, 2), (1, 0, 4), (1, 1, 2)]  # (row, position, next token)
    want = -sum(F.log_softmax(logits[r, t], -1)[y] for r, t, y in pairs) / len(pairs)
    assert loss == pytest.approx(float(want), rel=1e-6) and nll == pytest.approx(float(want), rel=1e-6)
    smoothed, nll2 = caption_loss(logits, ids, mask, label_smoothing=0.1)
    assert nll2 == pytest.approx(float(want), rel=1e-6) and float(smoothed) != pytest.approx(float(want))


# ---------------------------------------------------------------------------------------------------- optimiser


def test_warmup_then_cosine_schedule():
    f = lr_lambda(
        ScheduleConfig(kind="cosine", warmup_steps=10, warmup_init_ratio=0.0, min_lr_ratio=0.1), 110
    )
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    g = lr_lambda(ScheduleConfig(kind="constant", warmup_steps=4), 100)
    assert g(2) == pytest.approx(0.5) and g(50) == 1.0


def test_weight_decay_skips_norms_biases_embeddings_and_temperature():
    import mmt

    model = mmt.create_model(TINY_TRI)
    skip = no_decay_names(model)
    names = dict(model.named_parameters())
    assert "contrastive.logit_scale" in skip
    assert any("token_embedding" in n for n in skip)
    assert all(n in skip for n, p in names.items() if p.ndim < 2)
    norm_weights = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norm_weights and all(f"{n}.weight" in skip for n in norm_weights)
    decayed = [n for n in names if n not in skip]
    assert decayed and all(names[n].ndim >= 2 for n in decayed)
    assert any(n.endswith("proj.text.weight") for n in decayed)


# ---------------------------------------------------------------------------------------------------- inputs


def test_missing_and_absent_modalities_become_safe_dummies():
    from mmt.config.loader import load_config as load
    from mmt.config.model import MultiModalConfig
    from mmt.training.inputs import model_inputs

    mcfg = load(TINY_TRI, schema=MultiModalConfig)
    batch = {
        "keys": ["a", "b"],
        "text_inputs": torch.tensor([[1, 70, 2], [0, 0, 0]]),
        "text_attention_mask": torch.tensor([[True, True, True], [False, False, False]]),
        "text_present": torch.tensor([True, False]),
        "image_features": torch.zeros(2, 3, 32, 32),
    }
    kwargs, present = model_inputs(batch, mcfg, ["text", "image", "audio"], torch.device("cpu"))
    assert present["text"].tolist() == [True, False] and present["image"].tolist() == [True, True]
    assert present["audio"].tolist() == [False, False]
    assert kwargs["text_attention_mask"].all()  # the absent row attends over its zeros, not over nothing
    assert kwargs["audio_features"].shape[0] == 2 and kwargs["audio_attention_mask"].all()
    import mmt

    out = mmt.create_model(mcfg)(**kwargs)
    assert all(torch.isfinite(e).all() for e in out.embeddings.values())


def _sleepy(seconds: float):
    """A loader whose every batch takes ``seconds`` to arrive."""
    while True:
        time.sleep(seconds)
        yield {"x": torch.zeros(2, 3), "keys": ["a", "b"]}


def _steps(clock: DataWaitClock, batches, n: int, compute_s: float) -> None:
    for _ in range(n):
        batch = clock.fetch(batches, torch.device("cpu"))
        assert batch["x"].shape == (2, 3) and batch["keys"] == ["a", "b"]
        time.sleep(compute_s)  # stands in for forward, backward and the optimizer step
        clock.step_done()


def test_data_wait_fraction_is_high_for_a_slow_loader_and_low_for_a_fast_one():
    slow = DataWaitClock()
    _steps(slow, _sleepy(0.1), 3, compute_s=0.0)
    assert slow.wait_s >= 0.3 and 0.9 < slow.fraction <= 1.0
    fast = DataWaitClock()
    _steps(fast, _sleepy(0.0), 3, compute_s=0.1)
    assert fast.step_s >= 0.3 and 0.0 <= fast.fraction < 0.5
    assert DataWaitClock().fraction == 0.0  # no step yet
    # The meter reduces the clock's sums into the logged train/data_wait_frac (no process group: one rank).
    meter = StepMeter()
    meter.data = slow
    meter.add({"loss": torch.tensor(1.0)})
    means, _, _ = meter.reduce(torch.device("cpu"))
    assert means["data_wait_frac"] == pytest.approx(slow.fraction) and means["loss"] == 1.0


def test_demo_prints_the_mean_logged_data_wait(tmp_path):
    from mmt.training.demo import _data_wait_line

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "train/loss": 2.0, "train/data_wait_frac": 0.02}, {"step": 1, "val/loss": 1.0}]
    rows.append({"step": 2, "train/loss": 1.5, "train/data_wait_frac": 0.04})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _data_wait_line(path).startswith("  data wait: 3.0 % of step time on average over 2 log lines")
    assert _data_wait_line(tmp_path / "missing.jsonl") is None


def test_split_micro_batches():
    from mmt.training.trainer import split_micro

    batch = {"keys": list("abcdef"), "x": torch.arange(6)}
    parts = split_micro(batch, 3)
    assert [p["keys"] for p in parts] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert [p["x"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert [len(p["keys"]) for p in split_micro({"keys": list("abcde")}, 2)] == [2, 3]


# ---------------------------------------------------------------------------------------------------- checkpoints


def _tag(root, step, complete=True):
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete is not None:
        (d / META_FILE).write_text(json.dumps({"step": step, "complete": complete}))
    return d


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "run/checkpoints"
    assert resume_point("auto", tmp_path / "run") is None  # nothing yet: a fresh start
    assert resume_point("", tmp_path / "run") is None
    _tag(root, 10)
    _tag(root, 20)
    _tag(root, 30, complete=None)  # a save that died half-way: no meta file
    _tag(root, 40, complete=False)
    (root / "latest").write_text("step_00000030\n")  # even a stale pointer does not win
    assert [s for s, _ in complete_tags(root)] == [10, 20]
    assert resume_point("auto", tmp_path / "run") == root / "step_00000020"
    assert resume_point(str(tmp_path / "run"), tmp_path / "other") == root / "step_00000020"
    assert resume_point(str(root / "step_00000010"), tmp_path) == root / "step_00000010"
    # the same resolver serves the tools: an explicit tag, the `latest` pointer when it names a finished save
    assert resolve_tag_dir(tmp_path / "run", "step_00000010") == root / "step_00000010"
    (root / "latest").write_text("step_00000010\n")
    assert resume_point("auto", tmp_path / "run") == root / "step_00000010"
    assert resolve_tag_dir(root) == root / "step_00000010"
    with pytest.raises(RuntimeError, match="step_00000040/mmt_meta.json: complete is not true"):
        resume_point(str(root / "step_00000040"), tmp_path)
    with pytest.raises(RuntimeError, match="step_00000030/mmt_meta.json: missing"):
        resolve_tag_dir(root, "step_00000030", complete=True)
    with pytest.raises(RuntimeError, match="step_00000050: no such checkpoint tag"):
        resolve_tag_dir(tmp_path / "run", "step_00000050")
    with pytest.raises(RuntimeError, match="nope: no such checkpoint"):
        resume_point(str(tmp_path / "nope"), tmp_path)


def test_client_state_round_trips_and_picks_per_rank_states():
    from mmt.ckpt.client_state import ClientState

    saved = ClientState(step=5, samples_seen=40, rng_states=["r0", "r1"], loader_states=[{"e": 1}, {"e": 1}])
    client = saved.to_client_state()
    assert set(client) == {"mmt"}  # nested: DeepSpeed's own keys stay apart
    back = ClientState.from_client_state(client)
    assert back == saved
    assert back.rank_rng(1) == "r1" and back.rank_rng(2) is None  # a rank the saved run did not have
    assert back.rank_loader(3) == {"e": 1}  # world-size independent loader position: rank 0's serves
    foreign = ClientState.from_client_state({"step": 2, "rng_states": ["x"]})  # not mmt's record: none of it
    assert (foreign.step, foreign.rank_rng(0), foreign.rank_loader(0)) == (-1, None, None)


# ---------------------------------------------------------------------------------------------------- preemption


def test_preemption_flag_and_marker(tmp_path):
    assert parse_signals(["SIGTERM", " usr1"]) == [signal.SIGTERM, signal.SIGUSR1]
    with pytest.raises(ValueError, match="SIGNOPE"):
        parse_signals(["SIGNOPE"])
    flag = PreemptionFlag([signal.SIGUSR1])
    try:
        assert not flag.should_stop(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler only sets the flag
        assert flag.should_stop(torch.device("cpu")) and flag.received == signal.SIGUSR1
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    # After a complete preemption save a rank shuts down shielded: srun's SIGTERM must not cut that short.
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)}
    try:
        PreemptionFlag([signal.SIGUSR1]).shield()
        os.kill(os.getpid(), signal.SIGTERM)  # ignored, or this test process would be gone
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in previous)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert exited_due_to_preemption(PREEMPTED_EXIT_CODE) and not exited_due_to_preemption(1, tmp_path)
    write_marker(tmp_path, 7, "ckpt", "SIGTERM")
    assert exited_due_to_preemption(1, tmp_path)  # torchrun turns the code into 1; the marker remains


def test_mlflow_metric_names_are_sanitised():
    from mmt.tracking.mlflow_logger import metric_name

    assert metric_name("val/recall@1") == "val/recall_at_1"
    assert metric_name("train/loss") == "train/loss"


@pytest.mark.parametrize(
    "path",
    sorted(str(p) for p in (TINY_TRI.parents[1] / "task").glob("*.yaml"))
    + [str(TINY_TRI.parents[1] / "train/demo.yaml")],
)
def test_shipped_run_configs_load_and_build(path):
    import mmt
    from mmt.training.tasks import build_task

    cfg = load_config(path)
    build_task(cfg.model, cfg.train)
    assert mmt.create_model(cfg.model).num_parameters() > 0
    resolve_batch(cfg.train, 2)


def test_activation_checkpointing_recomputes_blocks_with_identical_gradients():
    import mmt
    from mmt.config.loader import load_config as load
    from mmt.config.model import MultiModalConfig
    from mmt.model.block import TransformerBlock
    from mmt.training.activation_checkpointing import apply_activation_checkpointing
    from mmt.training.inputs import model_inputs

    mcfg = load(TINY_TRI, schema=MultiModalConfig)
    torch.manual_seed(0)
    kwargs, _ = model_inputs(
        {
            "keys": ["a", "b"],
            "image_features": torch.randn(2, 3, 32, 32),
            "text_inputs": torch.randint(3, 259, (2, 10)),
            "text_attention_mask": torch.ones(2, 10, dtype=torch.bool),
        },
        mcfg,
        ["text", "image", "audio"],
        torch.device("cpu"),
    )
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(1)
        model = mmt.create_model(mcfg)
        calls = []
        if checkpointed:
            n = apply_activation_checkpointing(model)
            assert n == sum(isinstance(m, TransformerBlock) for m in model.modules()) > 0
            for m in model.modules():
                if isinstance(m, TransformerBlock):
                    m.attn.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        out = model(**kwargs)
        sum(e.sum() for e in out.embeddings.values()).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        if checkpointed:  # every block's attention ran twice: forward, then recomputed in backward
            assert len(calls) == 2 * n
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6)


PORT_RACE = """
import os, socket
import torch.distributed as dist
import mmt.training.distributed as D

held = socket.socket()
held.bind(("127.0.0.1", 0))
held.listen()
taken, picks, real = held.getsockname()[1], [], D.free_port
D.free_port = lambda: picks.append(1) or (taken if len(picks) == 1 else real())
D.setup_distributed()
assert int(os.environ["MASTER_PORT"]) != taken and dist.get_world_size() == 1, os.environ["MASTER_PORT"]
dist.destroy_process_group()
print("picks", len(picks))
"""


def test_single_process_retries_when_its_port_is_taken_before_the_store_binds_it():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    r = subprocess.run(
        [sys.executable, "-c", PORT_RACE], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0 and "picks 2" in r.stdout, r.stdout + r.stderr


RDZV_BOUND = """
import os, socket
from datetime import timedelta
import torch.distributed as dist
import mmt.training.distributed as D

def setup(rank, world):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(D.free_port()))
    D.setup_distributed("cpu", "gloo", timeout_s=600, rdzv_timeout_s=1)

for rank in (0, 1):  # rank 0 waits for a rank that never comes; rank 1 finds nobody at MASTER_ADDR
    try:
        setup(rank, 2)
    except RuntimeError as e:
        print("error:", str(e).splitlines()[0])
setup(0, 1)
print("store timeout", int(dist.distributed_c10d._get_default_store().timeout.total_seconds()))
dist.destroy_process_group()
"""


def test_rendezvous_is_bounded_by_its_own_timeout_then_collectives_by_the_collective_one():
    """train.rdzv_timeout_s (1 s here) ends a rendezvous that lacks a rank, on the hosting rank 0 and on a rank
    that finds no host, while train.dist_timeout_s (600 s) stays the bound of everything after it: without the
    rendezvous bound this script would run into the subprocess timeout."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    r = subprocess.run(
        [sys.executable, "-c", RDZV_BOUND], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0, r.stdout + r.stderr
    errors = [line for line in r.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, r.stdout + r.stderr
    for rank, line in enumerate(errors):
        assert f"(rank {rank} of 2): not every rank joined within train.rdzv_timeout_s=1 s" in line, line
    assert "store timeout 600" in r.stdout, r.stdout
