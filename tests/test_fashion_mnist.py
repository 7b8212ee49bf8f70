"""The Fashion-MNIST DataModule: the real Debian files (skipped when the package is absent), tiny IDX files written
here (exact pixels and labels, plain and gzipped), the held-out/train/calibration split, and the errors; plus the
held-out and subset arguments of GLUE."""

from __future__ import annotations

import pytest
import torch
from tiny_image_assets import FASHION_MNIST, has_fashion_mnist, write_idx
from tiny_text_assets import SHARED_DATA, wikitext_tokenizer

from prehab.datamodules import GLUE, FashionMNIST
from prehab.datamodules.fashion_mnist import MEAN, STD

needs_package = pytest.mark.skipif(
    not has_fashion_mnist(), reason=f"Debian's dataset-fashion-mnist is not installed ({FASHION_MNIST} is missing)"
)


def write_tiny(folder, train=20, test=10, gz=True):
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    data = {}
    for prefix, count in (("train", train), ("t10k", test)):
        images = torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8)
        labels = torch.arange(count, dtype=torch.uint8) % 10
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        data[prefix] = (images, labels)
    return data


@needs_package
def test_real_files_split_sizes_normalization_and_seeded_subsets(tmp_path):
    module = FashionMNIST(
        cache_dir=str(tmp_path),
        heldout_samples=1000,
        train_samples=5000,
        max_eval_samples=500,
        calibration_samples=64,
        batch_size=250,
    )
    module.setup("fit")
    assert len(module.split(train=True)) == 60000 and len(module.split(train=False)) == 10000
    indices = module.indices
    assert len(indices["heldout"]) == 1000 and len(indices["train"]) == 5000
    assert not set(indices["heldout"]) & set(indices["train"])
    assert set(indices["calibration"]) <= set(indices["train"]) and len(indices["calibration"]) == 64
    images, labels = next(iter(module.val_dataloader()))
    assert images.shape == (250, 1, 28, 28) and labels.dtype == torch.int64
    assert abs(images.mean().item()) < 0.15 and abs(images.std().item() - 1) < 0.15  # the training set's mean/std
    assert len(module.val_dataloader().dataset) == 500 and len(module.heldout_dataloader().dataset) == 1000
    assert sorted(torch.cat([y for _, y in module.heldout_dataloader()]).unique().tolist()) == list(range(10))
    again = FashionMNIST(cache_dir=str(tmp_path), heldout_samples=1000, train_samples=5000, calibration_samples=64)
    assert again.indices == indices  # seeded: the same split every time
    other = FashionMNIST(cache_dir=str(tmp_path), heldout_samples=1000, train_samples=5000, seed=1)
    assert other.indices["heldout"] != indices["heldout"]


@pytest.mark.parametrize("gz", [True, False])
def test_tiny_idx_files_load_exactly(tmp_path, gz):
    data = write_tiny(tmp_path / "idx", gz=gz)
    module = FashionMNIST(
        root=str(tmp_path / "idx"),
        cache_dir=str(tmp_path / "cache"),
        augment=False,
        calibration_samples=4,
        batch_size=20,
    )
    images, labels = next(iter(module.test_dataloader()))
    expected = (data["t10k"][0].float() / 255 - MEAN) / STD
    assert torch.allclose(images[:, 0], expected, atol=1e-5)
    assert labels.tolist() == data["t10k"][1].long().tolist()
    train_images, _ = next(iter(module.train_dataloader()))
    assert train_images.shape == (20, 1, 28, 28)
    calibration = [x for x, _ in module.calibration_dataloader()]
    assert sum(len(x) for x in calibration) == 4
    # training augmentation changes images, evaluation never does
    augmenting = FashionMNIST(root=str(tmp_path / "idx"), cache_dir=str(tmp_path / "cache"), batch_size=20)
    assert not torch.equal(next(iter(augmenting.train_dataloader()))[0], train_images)
    assert torch.equal(next(iter(augmenting.test_dataloader()))[0], images)


def test_missing_files_name_the_folder_and_the_apt_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*apt-get install dataset-fashion-mnist"):
        FashionMNIST(root=str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "cache")).setup("fit")
    write_tiny(tmp_path / "idx")
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks the Fashion-MNIST IDX files \['t10k-labels-idx1-ubyte'\]"):
        FashionMNIST(root=str(tmp_path / "idx"), cache_dir=str(tmp_path / "cache")).setup("test")


def test_a_malformed_idx_file_and_bad_arguments_fail_clearly(tmp_path):
    write_tiny(tmp_path / "idx")
    write_idx(tmp_path / "idx" / "t10k-images-idx3-ubyte.gz", torch.zeros(10, dtype=torch.uint8))  # 1-D "images"
    with pytest.raises(ValueError, match="3 dimension"):
        FashionMNIST(root=str(tmp_path / "idx"), cache_dir=str(tmp_path / "cache")).setup("test")
    with pytest.raises(ValueError, match="`heldout_samples`"):
        FashionMNIST(heldout_samples=-1)
    with pytest.raises(ValueError, match="`train_samples`"):
        FashionMNIST(train_samples=0)
    write_tiny(tmp_path / "ok")
    with pytest.raises(ValueError, match=r"`heldout_samples`=20 leaves no training image"):
        FashionMNIST(root=str(tmp_path / "ok"), cache_dir=str(tmp_path / "c2"), heldout_samples=20).setup("fit")
    with pytest.raises(ValueError, match="heldout_samples > 0"):
        FashionMNIST(root=str(tmp_path / "ok"), cache_dir=str(tmp_path / "c2")).heldout_dataloader()


@pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="needs ../shared/data/glue")
def test_glue_heldout_and_subsets_are_disjoint_seeded_and_sized():
    tokenizer = wikitext_tokenizer(500)
    module = GLUE(
        task="rte",
        tokenizer=tokenizer,
        dataset=str(SHARED_DATA / "glue"),
        heldout_samples=100,
        max_train_samples=300,
        max_eval_samples=50,
        calibration_samples=16,
    )
    module.setup("fit")
    assert len(module.train_dataset) == 300 and len(module.heldout_dataset) == 100
    train_texts = {tuple(ids) for ids in module.train_dataset["input_ids"]}
    heldout_texts = {tuple(ids) for ids in module.heldout_dataset["input_ids"]}
    assert not train_texts & heldout_texts  # (RTE has no duplicate pairs among these)
    calibration = {
        tuple(row[m.bool()].tolist())
        for b in module.calibration_dataloader()
        for row, m in zip(b["input_ids"], b["attention_mask"], strict=True)
    }
    assert calibration <= train_texts
    assert len(module.val_dataloader().dataset) == 50
    assert sum(len(b["labels"]) for b in module.heldout_dataloader()) == 100
    full = GLUE(task="rte", tokenizer=tokenizer, dataset=str(SHARED_DATA / "glue"))
    full.setup("fit")
    assert len(full.train_dataset) == 2490 and full.heldout_dataset is None  # defaults: unchanged
    with pytest.raises(ValueError, match="`max_eval_samples`"):
        GLUE(task="rte", max_eval_samples=0)
