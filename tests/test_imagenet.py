"""ImageNet Linf (RobustBench's fourth leaderboard): the ImageFolder source with lazy decoding,
its transforms (checked against torchvision's), RobustBench's 5,000-image evaluation subset,
the Singh et al. 2023 presets, their schedule and optimizer, and the CLI loop train -> eval ->
export -> leaderboard on a tiny ImageFolder tree written here."""
from __future__ import annotations

import json
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from _extras import need
from rb_labelrefine.config import ConfigError, apply_overrides, config_from_dict, list_presets, load_config, load_raw
from rb_labelrefine.data import CorruptDatasetError, DatasetNotFoundError, build_datasets
from rb_labelrefine.data.imagenet import (ImageNetEval, ImageNetTrain, load_imagenet, robustbench_subset_ids)

Image = need("PIL.Image")
WNIDS = ("n01440764", "n01443537", "n01484850")


def write_tree(root, n_train=6, n_val=2, val_names=None, size=(40, 44)):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in WNIDS:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                name = f"img{i}.png" if split == "train" or val_names is None else val_names[c][i]
                Image.fromarray(rng.integers(0, 256, (size[0] + i, size[1], 3), dtype=np.uint8)).save(d / name)
    return root


# ----------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("wh", [(300, 200), (64, 90), (17, 23)])
@pytest.mark.parametrize("size", [224, 16])
def test_transforms_equal_torchvision(wh, size):
    T = need("torchvision.transforms")
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    ref = T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.ToTensor()])(img)
    assert torch.equal(ImageNetEval(size)(img), ref)   # Res256Crop224 at size 224
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(5)
        a = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()])(img)
        torch.manual_seed(5)
        b = ImageNetTrain(size)(img)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- the source

def test_imagefolder_is_lazy_and_whole_val_without_the_subset(tmp_path):
    root = write_tree(tmp_path / "tree")
    train, test, info = load_imagenet(root, image_size=16, subset_ids=[])
    assert (info.name, info.num_classes, info.image_size) == ("imagenet", 3, 16)
    assert len(train) == 18 and len(test) == 6 and "whole val folder" in info.source
    assert train.paths.dtype.kind == "S"   # paths only, as bytes: nothing decoded up front
    x, y = train[7]
    assert x.shape == (3, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1 and int(y) == 1
    clone = pickle.loads(pickle.dumps(train))   # DataLoader workers receive it pickled
    assert torch.equal(clone[7][0], x)


def test_robustbench_subset_is_the_test_split_when_present(tmp_path):
    names = {c: [f"ILSVRC2012_val_{i}{j}.png" for j in range(2)] for i, c in enumerate(WNIDS)}
    root = write_tree(tmp_path / "tree", val_names=names)
    ids = [f"{WNIDS[2]}/{names[WNIDS[2]][1]}", f"{WNIDS[0]}/{names[WNIDS[0]][0]}"]
    _, test, info = load_imagenet(root, image_size=16, subset_ids=ids)
    assert len(test) == 2 and test.targets.tolist() == [2, 0] and "2-image" in info.source
    with pytest.raises(CorruptDatasetError, match="1 of the 2 images"):
        load_imagenet(root, subset_ids=ids[:1] + [f"{WNIDS[1]}/missing.png"])


def test_installed_robustbench_list_is_found():
    need("robustbench")
    ids = robustbench_subset_ids()
    assert ids is not None and len(ids) == 5000 and ids[0].startswith("n") and ids[0].endswith(".JPEG")


def test_bad_trees_name_the_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="ImageNet"):
        load_imagenet(tmp_path / "nothing")
    root = write_tree(tmp_path / "tree")
    (root / "val" / "n09999999").mkdir()
    with pytest.raises(CorruptDatasetError, match="no training folder"):
        load_imagenet(root, subset_ids=[])


def test_build_datasets_augments_with_random_resized_crop(tmp_path):
    root = write_tree(tmp_path / "tree")
    tr, val, te, info = build_datasets("imagenet", root=str(root), val_fraction=0.2, augment=True, image_size=16)
    assert isinstance(tr.dataset.dataset.transform, ImageNetTrain)
    assert tr[0][0].shape == val[0][0].shape == te[0][0].shape == (3, 16, 16)
    loader = torch.utils.data.DataLoader(tr, batch_size=4, num_workers=2)   # worker processes decode
    x, y, idx = next(iter(loader))
    assert x.shape == (4, 3, 16, 16)
    with pytest.raises(ConfigError, match="imagenet and synthetic only"):
        build_datasets("digits", image_size=16)


def test_image_size_is_for_imagenet_only():
    with pytest.raises(ConfigError) as exc:
        config_from_dict(apply_overrides(load_raw("cifar10-resnet18-pgdat"), ["data.image_size=64"]))
    assert exc.value.field == "data.image_size"


# ----------------------------------------------------------------------------- Singh et al. 2023

def test_singh_presets():
    names = [n for n in list_presets() if n.startswith("imagenet-")]
    assert {"imagenet-convnext_tiny-singh2023", "imagenet-vit_small-singh2023", "imagenet-convnext_base-singh2023",
            "imagenet-convnext_tiny-singh2023-adr"} <= set(names)
    for n in names:
        cfg = load_config(n)
        assert cfg.data.name == "imagenet" and math.isclose(cfg.attack.eps, 4 / 255)
        assert cfg.model.arch.startswith("timm:") and "revisiting-at" in cfg.description
        assert ("UNTRIED" in cfg.description) == n.endswith("-adr")
    c = load_config("imagenet-convnext_tiny-singh2023")
    o = c.optim
    assert (o.name, o.betas, o.lr, o.weight_decay, o.no_decay_1d, o.schedule) == \
        ("adamw", [0.9, 0.95], 1e-3, 0.05, True, "peak_cosine")
    assert (o.warmup_epochs, o.warmup_start_lr, o.lr_min, c.train.epochs) == (20, 1e-7, 5e-6, 300)
    assert (c.attack.name, c.attack.steps, c.wa.decay, c.method.smoothing) == ("apgd", 2, 0.9999, 0.1)


def test_peak_cosine_is_singhs_get_cosine_lr():
    """main.py get_cosine_lr(epoch) and train_loop's np.interp(arange(iters), [0, iters], [lr(e), lr(e+1)])."""
    from rb_labelrefine.training.schedule import lr_at

    epochs, peak, lr, iters = 30, 5, 1e-3, 7
    cfg = config_from_dict(apply_overrides(load_raw("imagenet-convnext_tiny-singh2023"),
                                           [f"train.epochs={epochs}", f"optim.warmup_epochs={peak}"]))

    def get_cosine_lr(epoch):
        if epoch <= peak:
            return np.interp([epoch], [0, peak], [1e-4 * lr, lr])[0]
        lr_min = 5e-6
        return lr_min + .5 * (lr - lr_min) * (1 + math.cos(math.pi * (epoch - peak) / (epochs - peak)))

    for e in range(epochs):
        lrs = np.interp(np.arange(iters), [0, iters], [get_cosine_lr(e), get_cosine_lr(e + 1)])
        for i in range(iters):
            assert lr_at(cfg, e, i, iters) == pytest.approx(lrs[i], rel=1e-12, abs=1e-18)


def test_adamw_without_decay_on_1d_parameters():
    from rb_labelrefine.training.build import build_optimizer

    cfg = load_config("imagenet-convnext_tiny-singh2023")
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = build_optimizer(cfg, m)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    decayed, flat = opt.param_groups
    assert [p.shape for p in decayed["params"]] == [m[0].weight.shape, m[2].weight.shape]
    assert flat["weight_decay"] == 0.0 and len(flat["params"]) == 4   # conv bias, LN weight + bias, linear bias


# ----------------------------------------------------------------------------- the CLI loop

def test_cli_train_eval_export_leaderboard(tmp_path, capsys):
    need("timm", "robustbench")
    from rb_labelrefine.cli import main

    root = write_tree(tmp_path / "tree")
    run, out = tmp_path / "run", tmp_path / "export"
    # model and data overridden (a tiny timm ConvNeXt on 32 px); attack.name=pgd: the preset's APGD
    # is torchattacks', an optional dependency
    rc = main(["train", "--config", "imagenet-convnext_tiny-singh2023", "--out", str(run), "--quiet", "--set",
               f"data.root={root}", "data.image_size=32", "model.arch=timm:convnext_atto", "train.epochs=1",
               "optim.warmup_epochs=0.5", "data.batch_size=6", "data.num_workers=0", "data.val_fraction=0.2",
               "eval.curve_test_size=6", "train.device=cpu", "attack.name=pgd"])
    assert rc == 0 and (run / "best.safetensors").is_file()
    res = tmp_path / "aa.json"
    assert main(["eval", "--checkpoint", str(run), "--n", "4", "--attacks", "apgd-ce", "--json", str(res)]) == 0
    assert json.loads(res.read_text())["dataset"] == "imagenet"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--name", "Test2026Tiny",
                 "--results", str(res)]) == 0
    info = json.loads((out / "model_info" / "imagenet" / "Linf" / "Test2026Tiny.json").read_text())
    assert info["eps"] == "4/255" and info["dataset"] == "imagenet"
    assert (out / "models" / "imagenet" / "Linf" / "Test2026Tiny.pt").is_file()
    assert "'preprocessing': 'Res256Crop224'" in (out / "model_zoo_entry.py").read_text()
    capsys.readouterr()
    assert main(["leaderboard", "--dataset", "imagenet", "--model-info",
                 str(out / "model_info" / "imagenet" / "Linf" / "Test2026Tiny.json")]) == 0
    text = capsys.readouterr().out
    assert "of 31" in text and "5,000" in text   # ranked among RobustBench's 30 ImageNet entries


def test_the_card_names_imagenets_augmentation():
    from rb_labelrefine.export.model_card import _config_highlights

    data = dict(_config_highlights({"data": {"name": "imagenet", "augment": True}}))["data"]
    assert "random-resized-crop+flip" in data
    assert "random-resized" not in dict(_config_highlights({"data": {"name": "cifar10", "augment": True}}))["data"]
