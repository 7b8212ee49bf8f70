"""`prehab fit ... --control_lam 0`: the same job again with λ = 0, compared stage by stage."""

import json

import pytest
import yaml

from prehab.callbacks import LowRankCompression
from prehab.cli import cli

TINY = """
seed_everything: 3
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  enable_checkpointing: false
  enable_model_summary: false
  enable_progress_bar: false
  num_sanity_val_steps: 0
  default_root_dir: {out}
  logger:
    class_path: CSVLogger
    init_args:
      save_dir: {out}
  callbacks:
    - class_path: SVDLLM
      init_args:
        ratio: 0.6
        calibration_batches: 2
        compare: [svd]
        save_dir: {out}
    - class_path: LoRARehab
      init_args:
        steps_per_factor: 2
        lr: 0.001
model:
  model: prehab:byte-llama
  pretrained: false
  lam: 0.05
  calibration_batches: 2
  lr: 0.003
data:
  class_path: StdlibText
  init_args:
    seq_len: 32
    batch_size: 4
    train_windows: 12
    calibration_samples: 8
    val_windows: 4
"""


def test_control_run_repeats_the_job_with_lambda_zero_and_compares(tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(out=out))
    run = cli(["fit", "--config", str(config), "--control_lam", "0"])

    comparison = json.loads((out / "control.json").read_text())
    assert comparison["lam"] == 0.05 and comparison["control_lam"] == 0.0
    models = [row["model"] for row in comparison["rows"]]
    assert models[0] == "before prehab" and models[-1] == "after rehab (LoRA)" and len(models) == 5
    before = comparison["rows"][0]
    # Same seed and data: identical before training, different after (only λ differs).
    assert before["metrics"]["perplexity"] == before["control_metrics"]["perplexity"]
    dense = comparison["rows"][1]
    assert dense["metrics"]["perplexity"] != dense["control_metrics"]["perplexity"]
    assert "λ = 0 (control)" in (out / "control.md").read_text()
    # The control run wrote its own outputs, under control/, and its model had λ = 0.
    control_report = json.loads((out / "control" / "report.json").read_text())
    assert [s["name"] for s in control_report["stages"]] == ["before_prehab", "dense", "svd_llm", "rehab"]
    assert (out / "control" / "compressed" / "prehab_compression.json").is_file()
    assert run.model.lam == 0.05
    main = next(c for c in run.trainer.callbacks if isinstance(c, LowRankCompression))
    assert main.report.stage("dense").metrics == dense["metrics"]
    saved = yaml.safe_load(next((out / "lightning_logs").rglob("config.yaml")).read_text())
    assert saved["control_lam"] == 0.0


def test_control_lam_must_be_a_number(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(out=tmp_path / "out"))
    with pytest.raises(SystemExit):  # jsonargparse: "Parser key 'control_lam' ... Expected a <class 'float'>"
        cli(["fit", "--config", str(config), "--control_lam", "zero"])
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_config_compresses_a_tied_lm_head_after_untie_lm_head(tmp_path):
    """From a config: untie_lm_head lets SVD-LLM factor byte-llama's tied head; the saved folder reloads untied."""
    from prehab import LowRankLinear, load_compressed

    out = tmp_path / "out"
    text = TINY.format(out=out).replace("        compare: [svd]\n", '        targets: ["layers\\\\.", "lm_head"]\n')
    rehab = "    - class_path: LoRARehab\n      init_args:\n        steps_per_factor: 2\n        lr: 0.001\n"
    text = text.replace(rehab, "")
    config = tmp_path / "head.yaml"
    config.write_text(text.replace("  pretrained: false\n", "  pretrained: false\n  untie_lm_head: true\n"))
    run = cli(["fit", "--config", str(config)])
    model = run.model.model
    assert isinstance(model.lm_head, LowRankLinear) and not model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.out_features
    reloaded = load_compressed(out / "compressed")
    assert isinstance(reloaded.lm_head, LowRankLinear) and reloaded.lm_head.rank == model.lm_head.rank

    # without it, the tied head is refused when fit starts, naming the option
    config.write_text(text)
    with pytest.raises(ValueError, match=r"untie_lm_head=True"):
        cli(["fit", "--config", str(config)])
