"""Every shipped YAML parses with the `prehab` CLI; the offline quickstart also instantiates."""

from pathlib import Path

import pytest

from prehab.callbacks import SVDLLM
from prehab.cli import PrehabCLI, cli
from prehab.datamodules import StdlibText
from prehab.module import PrehabModule

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


class ParseOnly(PrehabCLI):
    """Parses and type-checks a config without building anything that would need a download or a GPU."""

    def instantiate_classes(self) -> None:
        pass


def test_there_are_configs_for_every_paper_setting():
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "vit_b16_imagenet", "llama7b_wikitext2", "smollm2_wikitext", "minilm_sst2"} <= names
    assert {
        f"bert_base_glue_{t}" for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses(path):
    from lightning.pytorch import LightningDataModule

    cli = ParseOnly(
        PrehabModule,
        LightningDataModule,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(path)],
        save_config_kwargs={"overwrite": True},
    )
    config = cli.config
    assert config.model.task in ("causal_lm", "sequence_classification", "regression", "image_classification")
    assert config.model.lam >= 0
    callbacks = config.trainer.callbacks
    assert callbacks and callbacks[0].class_path.startswith("prehab.callbacks.")
    assert config.data.class_path.startswith("prehab.datamodules.")


def test_quickstart_instantiates_offline():
    built = cli(["--config", str(next(p for p in CONFIGS if p.stem == "quickstart"))], run=False)
    assert isinstance(built.model, PrehabModule) and isinstance(built.datamodule, StdlibText)
    assert any(isinstance(c, SVDLLM) and c.compare == ["svd", "aa_svd"] for c in built.trainer.callbacks)
    assert built.model.model.config.vocab_size == 256


def test_cli_rejects_bad_values_with_the_argument_name():
    with pytest.raises(ValueError, match=r"regularizer='rank'.*'stable_rank'"):
        cli(
            ["--config", str(next(p for p in CONFIGS if p.stem == "quickstart")), "--model.regularizer", "rank"],
            run=False,
        )
