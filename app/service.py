"""What the app does, without the UI: validation, one thread for the model, the reference cache, the store.

Every public method takes plain values (as widgets deliver them) or the parameter objects built from them
(`sampling`, `fusion`, `train_config`), validates them and raises UserError with a message meant for the
screen. The UI turns UserError into a toast; nothing here imports gradio. The UI never touches the store or
a tensor: every read of the pairs, the masks and the attention maps goes through a method here.

One class per tab in app/services/ (model and weights, fuse, dataset, train, ablations); AppService is all of
them over one model, one store and one reference cache, so the UI and the API keep one object and one set of
method names. app/session.py holds what they share (Session, UserError, the typed-value checks).
"""
from __future__ import annotations

from dfusion_core.engine.progress import FusionCancelled  # fuse raises it when a newer fusion of the session won

from .services.ablations import AblationService
from .services.dataset import DatasetService
from .services.fuse import FuseService
from .services.model import ModelService
from .services.train import TrainService
from .session import (EXPORT_DIR, LORA_FILE, MAX_ADAPTERS, MAX_CANDIDATES, MAX_ROUND_PROMPTS, MAX_ROUNDS, MAX_SEED,
                      MAX_TRAINING_JOBS, MAX_UNDO_DELETES, PAIR_COLUMNS, TUNED_ADAPTER, Candidate, FuseControls, Session,
                      UserError, check_prompt, example_prompts, model_name, parse_seed, score_cell)


class AppService(FuseService, DatasetService, TrainService, AblationService, ModelService):
    """What the app does, by tab; constructed as ModelService (the model, the store, the cache, the limits)."""


__all__ = ["AppService", "Candidate", "FusionCancelled", "EXPORT_DIR", "FuseControls", "LORA_FILE", "MAX_ADAPTERS", "MAX_CANDIDATES", "MAX_ROUNDS",
           "MAX_ROUND_PROMPTS", "MAX_SEED", "MAX_TRAINING_JOBS", "MAX_UNDO_DELETES", "PAIR_COLUMNS", "Session",
           "TUNED_ADAPTER", "UserError", "check_prompt", "example_prompts", "model_name", "parse_seed", "score_cell"]
