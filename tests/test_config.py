"""The typed config tree: files, includes, overrides, round-trip, and an error naming file + key for each kind
of bad input."""

from __future__ import annotations

import json

import pytest

from mmt.config import Config, ConfigError, MultiModalConfig, load_config, save_config
from mmt.model.factory import create_model


def _write(path, text):
    path.write_text(text)
    return path


def test_defaults_include_and_overrides(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    run = _write(sub / "run.yaml", "model: ../model.yaml\ntrain: {seed: 3}\n")
    _write(tmp_path / "model.yaml", "dim: 48\nnum_heads: 4\nimage: {patch_size: 4}\ntext: {}\n")
    cfg = load_config(run, ["model.image.depth=5", "model.attention.kind=linear", "train.seed=7"])
    assert isinstance(cfg, Config)
    assert cfg.model.dim == 48 and cfg.model.image.patch_size == 4
    assert cfg.model.image.depth == 5 and cfg.model.text.depth is None  # per-tower override only
    assert cfg.model.attention.kind == "linear"
    assert cfg.train.seed == 7
    assert cfg.model.audio is None


def test_list_keys_take_lists_or_comma_strings(tmp_path):
    """preempt_signals, tracking.tags, tracking.redact_keys and init_weights_only are lists; a comma string
    (command line or file) splits, taken as typed (``*FOO*`` is not a YAML alias); MLflow params show lists as
    that comma string; a list where slurm.env wants NAME: value pairs is an error naming the key."""
    from mmt.config import flatten
    from mmt.config.loader import redacted_config

    run = _write(tmp_path / "run.yaml", "tracking: {tags: 'team=vision, ci=1'}\n")
    cfg = load_config(
        run,
        [
            "train.preempt_signals=SIGTERM,USR1",
            "train.init_weights_only=[text,image]",
            "tracking.redact_keys=*FOO*, *_bar",
            "slurm.env.MY_FOO=x",
            "slurm.env.BAR=y",
        ],
    )
    assert cfg.train.preempt_signals == ["SIGTERM", "USR1"]
    assert cfg.tracking.tags == ["team=vision", "ci=1"]
    assert cfg.train.init_weights_only == ["text", "image"]
    assert cfg.tracking.redact_keys == ["*FOO*", "*_bar"]
    params = flatten(redacted_config(cfg))
    assert (
        params["train.preempt_signals"] == "SIGTERM,USR1" and params["tracking.redact_keys"] == "*FOO*,*_bar"
    )
    assert params["slurm.env.MY_FOO"] == "***" and params["slurm.env.BAR"] == "y"
    assert (
        params["train.tasks.retrieval.zero_shot_templates"] == "{c}"
        and params["train.init_weights_only"] == "text,image"
    )
    for bad, key in (("slurm.env=[A=1]", "slurm.env"), ("slurm.env.A=[1,2]", "slurm.env.A")):
        with pytest.raises(ConfigError, match="expected a") as err:
            load_config(None, [bad])
        assert err.value.key == key
    with pytest.raises(ConfigError, match="not a list") as err:
        load_config(_write(tmp_path / "env.yaml", "slurm: {env: [A=1]}\n"))
    assert err.value.key == "slurm.env" and err.value.source.endswith("env.yaml")
    assert load_config(None, ["train.preempt_signals="]).train.preempt_signals == []
    assert Config().train.preempt_signals == ["SIGTERM", "SIGUSR1"]
    with pytest.raises(ConfigError, match="train.preempt_signals: unknown signal 'FOO'"):
        load_config(None, ["train.preempt_signals=SIGTERM,FOO"])


def test_round_trip(tmp_path):
    cfg = load_config(
        "configs/model/tiny_tri.yaml", ["attention.kind=sparse", "audio.depth=1"], schema=MultiModalConfig
    )
    assert cfg.attention.kind == "sparse" and cfg.audio.depth == 1
    run = tmp_path / "run.yaml"
    run.write_text(
        "model: " + str(__import__("pathlib").Path("configs/model/tiny_tri.yaml").resolve()) + "\n"
    )
    full = load_config(run, ["model.attention.kind=sparse", "model.audio.depth=1", "tracking.run_name=x"])
    assert full.model == cfg
    saved = save_config(full, tmp_path / "config.yaml")
    assert load_config(saved) == full
    # and again through JSON
    json_path = tmp_path / "config.json"
    json_path.write_text(json.dumps(__import__("mmt.config", fromlist=["to_dict"]).to_dict(full)))
    assert load_config(json_path) == full


@pytest.mark.parametrize(
    "text,key,words",
    [
        ("model: {bogus: 1}\n", "model.bogus", "not in"),
        ("model: {depth: deep}\n", "model.depth", "could not be converted"),
        ("model: {dim: 0}\n", "model.dim", ">= 1"),
        ("model: {attention: {kind: fancy}}\n", "model.attention.kind", "'fancy' is not one of"),
        ("model: {ffn: relu2}\n", "model.ffn", "is not one of"),
        ("model: {num_heads: 5}\n", "model.num_heads", "do not divide"),
        (
            "model: {text: {}, attention: {kind: linear}, positional: relative}\n",
            "model.attention.kind",
            "relative",
        ),
        ("model: {image: {patch_size: 5}}\n", "model.image.patch_size", "does not divide"),
        ("model: {attention: {kind: reformer, num_buckets: 3}}\n", "model.attention.num_buckets", "even"),
        ("model: {attention: {kind: performer}, positional: relative}\n", "model.attention.kind", "relative"),
        ("train: {task: translation}\n", "train.task", "is not one of"),
    ],
)
def test_bad_file_values_name_file_and_key(tmp_path, text, key, words):
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.source == str(path)
    assert err.value.key == key
    assert words in str(err.value)
    assert str(path) in str(err.value) and key in str(err.value)


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.attention.kindd=mha", "model.attention.kindd"),
        ("model.depth=1.5", "model.depth"),
        ("model.audio.n_mels=-3", "model.audio.n_mels"),
        ("nodots", "nodots"),
        ("train.caption_max_tokens=6", "train.caption_max_tokens"),
    ],
)
def test_bad_override_names_override_and_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert err.value.key == key
    assert "command-line override" in err.value.source and override in err.value.source
    if key == "train.caption_max_tokens":  # moved into the task's section: the error names the new key
        assert "train.tasks.captioning.max_tokens" in str(err.value)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(_write(tmp_path / "broken.yaml", "model: [unclosed\n"))
    run = _write(tmp_path / "run.yaml", "model: missing_model.yaml\n")
    with pytest.raises(ConfigError, match="missing_model.yaml"):
        load_config(run)


def test_create_model_from_design_doc_json():
    import torch

    model = create_model(
        "configs/base_text_image_model.json",
        ["depth=1", "image.image_size=32", "decoder.depth=1", "fusion.depth=1"],
    )
    b = 2
    out = model(
        text_inputs=torch.randint(3, 259, (b, 10)),
        text_attention_mask=torch.ones(b, 10, dtype=torch.bool),
        image_features=torch.randn(b, 3, 32, 32),
        image_attention_mask=None,
    )
    assert out.embeddings["text"].shape == (b, 512)
    assert out.embeddings["image"].shape == (b, 512)
    assert 0 < float(out.logit_scale.detach()) <= 100


def test_each_registered_task_has_its_settings_section_and_shard_builder_entry():
    """train.tasks and `mmt shards build --task` are built from the task registry; a task reads its own section."""
    from mmt.config.tasks import TASK_SPECS
    from mmt.data.build.process import TASKS as BUILD_TASKS
    from mmt.data.build.process import ProcessOptions
    from mmt.training.tasks import TASKS, build_task

    cfg = load_config("captioning_demo", ["train.tasks.captioning.max_tokens=7"])
    assert [f for f in vars(cfg.train.tasks)] == list(TASK_SPECS) == list(TASKS)
    assert build_task(cfg.model, cfg.train).settings.max_tokens == 7
    assert set(TASK_SPECS) < set(BUILD_TASKS)
    with pytest.raises(ValueError, match="'translation' is not one of"):
        ProcessOptions(task="translation")
