"""Every shipped YAML parses with the `prehab` CLI, and runs (one step, then its callbacks) on tiny substitutes."""

from pathlib import Path

import pytest
from config_runner import TinyAssets, run_config
from tiny_text_assets import SHARED_DATA

from prehab.callbacks import SVDLLM, LowRankCompression
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


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    return TinyAssets(tmp_path_factory.mktemp("tiny-assets"))


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent")
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_on_tiny_substitutes(path, tiny_assets, tmp_path, one_thread):
    """`prehab fit --config <shipped config>` with only paths and sizes substituted (see config_runner): one
    training step, validation, the callbacks at fit end, files written, and the config's own or Lightning's
    default logger on."""
    built = run_config(path, tiny_assets, tmp_path)
    trainer = built.trainer
    assert trainer.max_steps == 1 and trainer.global_step >= 1  # (a rehab callback may step on at fit end)
    assert trainer.logger is not None
    log_dir = Path(trainer.logger.log_dir)
    assert log_dir.is_relative_to(tmp_path) and (log_dir / "metrics.csv").is_file()
    compression = [c for c in trainer.callbacks if isinstance(c, LowRankCompression)]
    assert compression, "every shipped config compresses at fit end"
    for callback in compression:
        totals = callback.report.totals()
        assert totals["layers_compressed"] > 0 and totals["model_params_after"] < totals["model_params_before"]
        assert {"before_prehab", "dense", callback.method} <= set(callback.report.metrics)
        if callback.save_dir is not None:
            assert Path(callback.save_dir).is_relative_to(tmp_path)
            assert (Path(callback.save_dir) / "report.json").is_file()
