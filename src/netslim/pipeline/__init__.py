"""The corridor: recipe stages in order, the run directory, resume. The only place that knows stage order."""
from .recipe import Recipe, load_recipe, parse_recipe
from .runner import restore_stage_model, run_recipe
from .stages import StageContext, build_config, get_stage, stage, stage_names

__all__ = ["Recipe", "load_recipe", "parse_recipe", "run_recipe", "restore_stage_model", "stage", "stage_names", "get_stage",
           "build_config", "StageContext"]
