"""Configs: the users' files load; every bad field is a one-line error naming file and field."""

import json

import pytest
from conftest import FIXTURES, REPO, assert_user_error, run_in_process, run_script, train_config

from myrtle_vision.config import load_config
from myrtle_vision.errors import ConfigError

V1 = FIXTURES / "v1-configs"


@pytest.mark.parametrize("name", ["vit_tiny", "vit_small", "vit_base", "deit_tiny", "deit_small", "deit_base"])
def test_users_v1_configs_load_unchanged(name, monkeypatch):
    monkeypatch.chdir(V1)  # their data_config_path is relative to the working directory
    cfg = load_config(f"train_configs/{name}.json")
    raw = json.loads((V1 / "train_configs" / f"{name}.json").read_text())
    for key, value in raw["train_config"].items():
        assert getattr(cfg.train_config, key) == value, key
    for key, value in raw["vit_config"].items():
        assert getattr(cfg.vit_config, key) == value, key
    assert cfg.data_config.number_of_classes == 45
    assert (cfg.distiller_config is not None) == name.startswith("deit")


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "train_configs").glob("*.json")))
def test_every_shipped_train_config_loads(path, monkeypatch):
    monkeypatch.chdir(REPO)  # data_config_path is relative to the working directory, as users run them
    cfg = load_config(f"train_configs/{path}")
    assert cfg.data_config.number_of_classes in (10, 45)


def test_demo_pair_differs_only_by_the_teacher():
    """The demo's ViT and DeiT train with the same budget: only the output folder and the teacher differ."""
    vit, deit = (json.loads((REPO / "train_configs" / f"{m}_demo.json").read_text()) for m in ("vit", "deit"))
    assert "distiller_config" not in vit and deit.pop("distiller_config")["distillation_type"] == "soft"
    assert vit["train_config"].pop("output_directory") != deit["train_config"].pop("output_directory")
    assert vit == deit
    extra = json.loads((REPO / "data_configs" / "fashion_mnist_extra.json").read_text())
    plain = json.loads((REPO / "data_configs" / "fashion_mnist.json").read_text())
    assert extra.pop("train_files") == "extra_imagepaths.txt" and plain.pop("train_files") == "train_imagepaths.txt"
    assert extra == plain  # the teacher pretrains with the students' splits, transforms and validation


def test_demo_configs_train_the_recipe_the_ablation_measured_best(tmp_path):
    """The demo trains DeiT's recipe without repeated augmentation, the variant benchmarks/recipe_ablation.py
    measured best on the demo data (docs/recipe.md): the same run, seed and folder aside."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from recipe_ablation import variant_config

    from myrtle_vision.seeds import trains

    for model in ("vit", "deit"):
        demo = REPO / "train_configs" / f"{model}_demo.json"
        measured = json.loads(variant_config(demo, model, "no_repeated_augmentation", 1, tmp_path).read_text())
        shipped = json.loads(demo.read_text())
        for cfg in (measured, shipped):
            cfg["train_config"].update(seed=0, output_directory="")
        assert trains(measured, "measured") == trains(shipped, str(demo))
        assert shipped["train_config"]["mixup"] > 0 and shipped["vit_config"]["drop_path"] > 0


@pytest.mark.parametrize("name", ["vit_tiny", "vit_small", "vit_base", "deit_tiny", "deit_small", "deit_base"])
def test_shipped_configs_keep_the_users_values(name):
    """The project's own train_configs/ hold the values users know (paths aside)."""
    ours = json.loads((REPO / "train_configs" / f"{name}.json").read_text())
    theirs = json.loads((V1 / "train_configs" / f"{name}.json").read_text())
    for section in ("train_config", "vit_config", "distiller_config", "dist_config"):
        for key, value in theirs.get(section, {}).items():
            assert ours[section][key] == value, f"{section}.{key}"
    assert (
        load_config(REPO / "train_configs" / f"{name}.json").vit_config.embed_dim == theirs["vit_config"]["embed_dim"]
    )


def test_q_config_is_accepted_as_the_readmes_name_for_q_format(tmp_path, data_cfg):
    path = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", vit={"q_format": None})
    raw = json.loads(path.read_text())
    del raw["vit_config"]["q_format"]
    raw["vit_config"]["q_config"] = "FP32"
    path.write_text(json.dumps(raw))
    assert load_config(path).vit_config.q_format == "FP32"


def _broken(tmp_path, data_cfg, edit):
    path = train_config(tmp_path / "broken.json", data_cfg, tmp_path / "out")
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    return path


BAD_TRAIN_CONFIGS = {
    "typo": (
        lambda r: r["train_config"].update(warmup_lrr=1e-6),
        "train_config.warmup_lrr",
        "did you mean 'warmup_lr'",
    ),
    "wrong type": (lambda r: r["train_config"].update(epochs="10"), "train_config.epochs", "integer"),
    "missing": (lambda r: r["train_config"].pop("lr"), "train_config.lr", "missing"),
    "patch": (lambda r: r["vit_config"].update(image_size=30), "vit_config.image_size", "patch_size"),
    "batch": (
        lambda r: r["train_config"].update(global_batch_size=10, local_batch_size=4),
        "train_config.global_batch_size",
        "local_batch_size",
    ),
    "negative lr": (lambda r: r["train_config"].update(lr=-0.1), "train_config.lr", "negative"),
    "optimizer": (lambda r: r["train_config"].update(optimizer="adamww"), "train_config.optimizer", "adamw"),
    "section typo": (lambda r: r.update(vit_confg=r.pop("vit_config")), "vit_confg", "did you mean 'vit_config'"),
    "heads": (lambda r: r["vit_config"].update(heads=5), "vit_config.embed_dim", "heads"),
    "teacher model": (
        lambda r: r.update(distiller_config={"teacher_weights_path": "t.pth", "teacher_model": "resnet5"}),
        "distiller_config.teacher_model",
        "did you mean 'resnet50'",
    ),
    "distillation type": (
        lambda r: r.update(distiller_config={"teacher_weights_path": "t.pth", "distillation_type": "hrad"}),
        "distiller_config.distillation_type",
        "did you mean 'hard'",
    ),
    "alpha": (
        lambda r: r.update(distiller_config={"teacher_weights_path": "t.pth", "alpha": 1.5}),
        "distiller_config.alpha",
        "[0, 1]",
    ),
    "teacher size": (
        lambda r: r.update(distiller_config={"teacher_weights_path": "t.pth", "teacher_image_size": 4}),
        "distiller_config.teacher_image_size",
        "[8, 4096]",
    ),
    "repeats": (
        lambda r: r["train_config"].update(repeated_augmentation=0),
        "train_config.repeated_augmentation",
        "[1, 2^31]",
    ),
    "class weights name": (
        lambda r: r["train_config"].update(class_weights="balance"),
        "train_config.class_weights",
        "did you mean 'balanced'",
    ),
    "class weights type": (
        lambda r: r["train_config"].update(class_weights=2),
        "train_config.class_weights",
        "a string or a list of finite numbers or null",
    ),
    "negative class weight": (
        lambda r: r["train_config"].update(class_weights=[1, -0.5, 1]),
        "train_config.class_weights",
        "non-negative",
    ),
    "class weights all 0": (
        lambda r: r["train_config"].update(class_weights=[0, 0, 0]),
        "train_config.class_weights",
        "not all 0",
    ),
    # one weight per class of the data config (3 classes)
    "class weights count": (
        lambda r: r["train_config"].update(class_weights=[1, 2]),
        "train_config.class_weights",
        "2 weights, but",
    ),
    "sampler type": (
        lambda r: r["train_config"].update(class_balanced_sampler=1),
        "train_config.class_balanced_sampler",
        "true/false",
    ),
    "dist url": (
        lambda r: r.update(dist_config={"dist_url": "localhost:54321"}),
        "dist_config.dist_url",
        '"localhost:54321" is not a torch.distributed init URL (env://, tcp://HOST:PORT or file://PATH)',
    ),
    "dist url scheme": (
        lambda r: r.update(dist_config={"dist_url": "http://localhost:54321"}),
        "dist_config.dist_url",
        "not a torch.distributed init URL",
    ),
    "dist url type": (
        lambda r: r.update(dist_config={"dist_url": 54321}),
        "dist_config.dist_url",
        "expected a string, got 54321",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN_CONFIGS))
def test_bad_train_config_in_process(case, tmp_path, data_cfg):
    edit, field, hint = BAD_TRAIN_CONFIGS[case]
    path = _broken(tmp_path, data_cfg, edit)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.field == field and hint in str(e.value) and str(path) in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["typo", "wrong type", "missing", "patch", "batch", "negative lr", "class weights count"]
)
@pytest.mark.parametrize("script", ["train.py", "test.py"])
def test_bad_train_config_through_the_scripts(case, script, tmp_path, data_cfg):
    edit, field, hint = BAD_TRAIN_CONFIGS[case]
    path = _broken(tmp_path, data_cfg, edit)
    assert_user_error(run_in_process(script, "-c", path), str(path), field, hint)


@pytest.mark.parametrize("url", ["env://", "tcp://localhost:54321", "tcp://10.0.0.1:23456", "file:///tmp/rendezvous"])
def test_dist_url_accepts_what_torch_distributed_takes_and_does_not_use_it(url, tmp_path, data_cfg):
    """dist_config.dist_url is accepted and checked, but not used: torchrun's rendezvous gives the address."""
    path = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", dist_config={"dist_url": url})
    assert load_config(path).dist_config.dist_url == url
    assert load_config(train_config(tmp_path / "d.json", data_cfg, tmp_path / "out")).dist_config.dist_url == "env://"


@pytest.mark.slow
def test_a_bad_dist_url_stops_train_py_with_one_line(tmp_path, data_cfg):
    path = _broken(tmp_path, data_cfg, BAD_TRAIN_CONFIGS["dist url"][0])
    line = assert_user_error(run_script("train.py", "-c", path), str(path), "dist_config.dist_url", "localhost:54321")
    assert line == (
        f'error: {path}: dist_config.dist_url: "localhost:54321" is not a torch.distributed init URL '
        "(env://, tcp://HOST:PORT or file://PATH); it is not used (torchrun's rendezvous gives the "
        "address), so the default env:// will do"
    )


BAD_DATA_CONFIGS = {
    "unknown op": (
        {"transform_ops_train": {"RandomResizedCop": 32}},
        "transform_ops_train.RandomResizedCop",
        "RandomResizedCrop",
    ),
    "bad op argument": (
        {"transform_ops_val": {"Normalize": {"Mean": [0.5], "Std": [1, 1, 1]}}},
        "transform_ops_val.Normalize.Mean",
        "3 numbers",
    ),
    "classes type": ({"number_of_classes": "three"}, "number_of_classes", "integer"),
    "unknown field": ({"dataset_pth": "x"}, "dataset_pth", "dataset_path"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_DATA_CONFIGS))
def test_bad_data_config_names_the_data_config(case, tmp_path, data_cfg):
    change, field, hint = BAD_DATA_CONFIGS[case]
    raw = json.loads(data_cfg.read_text())
    raw.update(change)
    data_cfg.write_text(json.dumps(raw))
    path = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out")
    assert_user_error(run_in_process("train.py", "-c", path), str(data_cfg), field, hint)


@pytest.mark.slow
def test_not_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    assert_user_error(run_in_process("train.py", "-c", bad), str(bad), "not valid JSON")
    assert_user_error(run_in_process("train.py", "-c", tmp_path / "nope.json"), "nope.json", "not found")
