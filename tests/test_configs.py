"""Every shipped grid config loads and plans its cells: a typo in one fails here, not hours into a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrunlearn.config import load_config
from qrunlearn.experiment import plan_cells

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_configs_are_found():
    assert len(CONFIGS) >= 6


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_a_shipped_config_loads_and_plans_its_cells(path):
    config = load_config(path)
    cells = plan_cells(config)
    expected = len(config.methods) * len(config.strategies) * len(config.unlearn_seeds)
    assert len(cells) == 1 + expected
    assert len({cell.id for cell in cells}) == len(cells)  # every cell has its own folder
    for cell in cells[1:]:
        assert config.unlearn_config(cell.method, cell.strategy, cell.seed).seed == (cell.seed or config.seed)


def test_the_seeds_grid_names_a_cell_per_seed():
    config = load_config(next(p for p in CONFIGS if p.name == "smollm2-seeds.yaml"))
    ids = [cell.id for cell in plan_cells(config)]
    assert ids[:4] == ["references", "ga_gdr-full-s0", "ga_gdr-full-s1", "ga_gdr-full-s2"]
    assert config.data.synth is not None and config.data.synth.size == "small"


def test_the_strategy_grids_keep_the_learning_rates_they_were_measured_at():
    """SURE's factor moved into the strategy: the SmolLM2 strategy grid's SURE cells still train at 3e-4 (10x the
    full-FT lr), the built-in grid's at 3x the tiny default, as in the README's tables."""
    smollm2 = load_config(next(p for p in CONFIGS if p.name == "smollm2-strategies.yaml"))
    assert smollm2.unlearn_config("ga_gdr", "sure").effective_lr == pytest.approx(3e-4)
    assert smollm2.unlearn_config("ga_gdr", "full").effective_lr == pytest.approx(3e-5)
    tiny = load_config(next(p for p in CONFIGS if p.name == "strategies.yaml"))
    assert tiny.unlearn_config("npo_gdr", "sure").effective_lr == pytest.approx(3e-3)  # 3 x NPO full's 1e-3


def test_overrides_written_before_typed_strategies_still_read():
    """Results and resolved configs from before strategies were typed list every override, unset ones as null: the
    flat strategy fields read again (they were null), `onednn_linear` is `cpu_kernels`; a set one is named."""
    from qrunlearn.config import ExperimentConfig
    old = {"lr": 1e-4, "sure_percentile": None, "quail_weight": None, "quail_spec": None, "quail_margin": None,
           "qat": None, "qat_mix": None, "onednn_linear": False}
    config = ExperimentConfig.model_validate({"hparams": {"full": old}})
    assert config.hparams["full"].lr == 1e-4 and config.hparams["full"].cpu_kernels is False
    with pytest.raises(ValueError, match="'qat' is a strategy's setting now"):
        ExperimentConfig.model_validate({"hparams": {"full": {**old, "qat": "nf4"}}})
    with pytest.raises(ValueError, match="Extra inputs"):  # a typo is still refused
        ExperimentConfig.model_validate({"hparams": {"full": {"lrr": 1e-4}}})
