"""The model behind the page: loading it (here or behind the page), its status, its defaults, and the
LoRA adapters sessions switch between on the one model thread."""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

from dfusion_core.data.preference_store import PreferenceStore
from dfusion_core.engine.config import model_settings
from dfusion_core.engine.loading import LoadedModel, load_model, peek_model
from dfusion_core.engine.reference_cache import ReferenceCache

from ..model_thread import ModelThread
from ..session import LORA_FILE, MAX_ADAPTERS, MAX_TRAINING_JOBS, TUNED_ADAPTER, Session, UserError, model_name

log = logging.getLogger("dfusion.app")


class ModelService:
    def __init__(self, model: LoadedModel | str | None = None, store_dir: str | Path = "dfusion_data/store",
                 scorer=None, cache_bytes: int = 1 << 30, runs_dir: str | Path | None = None,
                 background: bool = False, load_options: dict | None = None, make_scorer=None,
                 scorer_source: str | None = None):
        """`model`: a LoadedModel, or a folder / hub id (None: the embedded model) loaded with `load_options`
        (load_model's device, dtype) - here, or with `background` on the model thread from `start_loading()`
        on, so that the page is served first (see `model`). `make_scorer`: makes the scorer after the model.
        `scorer_source`: the same scorer by name ('default', openclip:..., a folder), for on-policy children."""
        self.model_thread = ModelThread()  # one thread runs every model call, one at a time
        self._model: LoadedModel | None = model if isinstance(model, LoadedModel) else None
        self.load_error = self.scorer_error = self.load_seconds = self._loading = None
        self._load_t0 = time.perf_counter()
        if self._model is None and not background:
            self._model = load_model(model, **(load_options or {}))
        if self._model is not None:
            self.model_defaults = self._model.defaults
            self.model_source = self._model.base_id or self._model.model_id  # the weights the training child loads
        else:  # the folder is checked now (a wrong path is said at once); its weights load behind the page
            self.model_source, self.model_defaults = peek_model(model)
        self.runs_dir = Path(runs_dir) if runs_dir else Path(store_dir).expanduser().parent / "runs"
        self.jobs: dict[str, object] = {}  # session token -> that session's latest TrainingJob
        self.max_jobs = MAX_TRAINING_JOBS
        self._jobs_lock = threading.Lock()
        self._adapters: OrderedDict[str, int] = OrderedDict()  # loaded LoRA folder -> its file's mtime, LRU first
        self._stamps: dict[str, int] = {}  # LoRA folder -> mtime of the weights the cache's entries were made with
        self.scorer = scorer
        self.scorer_source = scorer_source  # the scorer's name for a training child (on-policy rewards)
        self.store = PreferenceStore(store_dir)
        self.cache = ReferenceCache(max_bytes=cache_bytes)
        self.seconds_per_image: float | None = None  # the last candidates' sampling speed (before / after)
        self._set_defaults(self.model_defaults)
        self._pending = (model, load_options or {}, make_scorer) if self._model is None else None
        if self._model is not None and make_scorer is not None:
            self.scorer = make_scorer()

    def _set_defaults(self, defaults: dict) -> None:
        """The model's defaults (its dfusion.json over the paper's) and the parameters the tabs open on."""
        self.model_defaults = defaults
        self.default_sampling, self.default_fusion = model_settings(defaults)  # the Fuse tab opens on the model's form
        self.default_mask = self.default_fusion.mask

    # ---- the model, loaded behind the page -------------------------------------------------------------
    @property
    def model(self) -> LoadedModel:
        """The loaded model; until it is loaded (or when loading failed) a UserError that says so, which every
        handler shows as it shows a refused input."""
        if self._model is None:
            raise UserError(self.model_status())
        return self._model

    @model.setter
    def model(self, value: LoadedModel) -> None:
        self._model = value

    @property
    def ready(self) -> bool:
        return self._model is not None

    def start_loading(self) -> None:
        """Start the background load (app.py: once the page is served, so that the two do not share the CPU)."""
        if self._pending is not None and self._loading is None:
            self._load_t0 = time.perf_counter()
            self._loading = self.model_thread.submit(self._load, *self._pending)

    def _load(self, model, options: dict, make_scorer) -> None:
        """Load the model, then the scorer (on the model thread); a failure is kept for model_status."""
        def why(e: Exception) -> str:
            return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        try:
            loaded = load_model(model, **options)
        except Exception as e:  # noqa: BLE001 - said on the page (model_status) and in the log
            self.load_error = why(e)
            log.error("could not load the model: %s", self.load_error)
            return
        try:
            self.scorer = make_scorer() if make_scorer is not None else self.scorer
        except Exception as e:  # noqa: BLE001 - the model works without scores; the page says why there are none
            self.scorer_error = why(e)
            log.error("could not load the scorer: %s", self.scorer_error)
        self._set_defaults(loaded.defaults)  # a hub id's defaults are known only now
        self.load_seconds = time.perf_counter() - self._load_t0
        self._model = loaded
        log.info("model ready in %.1f s: %s", self.load_seconds, self.model_source)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for a background load to end (at most `timeout` s); whether the model is ready."""
        if self._loading is not None:
            try:
                self._loading.result(timeout)
            except TimeoutError:
                pass
        return self.ready

    def model_status(self) -> str:
        """A line for the page: the model is loading (and for how long so far), failed to load, or ready."""
        name = model_name(self.model_source)
        if self._model is not None:
            took = f" (loaded in {self.load_seconds:.1f} s)" if self.load_seconds is not None else ""
            none = f"; no scores: the scorer could not be loaded ({self.scorer_error})" if self.scorer_error else ""
            return f"model `{name}` ready{took}{none}"
        if self.load_error is not None:
            return f"the model `{name}` could not be loaded: {self.load_error}"
        return (f"the model `{name}` is still loading ({time.perf_counter() - self._load_t0:.0f} s so far): "
                "sampling and fusing start when it is ready; the Dataset tab works now")

    # ---- the weights each session computes with -------------------------------------------------------
    # Every model call of a session runs on the model thread right after `_use(session.weights)`: peft keeps
    # each loaded LoRA as a named adapter, switching is a flag per layer, base = every adapter off. The model id
    # (base, or base+lora:FOLDER) follows the switch, and it leads the reference cache's key and every result's
    # model_id: a cached reference is found only under the weights that computed it (one user re-fusing keeps
    # hitting the cache while another computes with other weights), and a stored pair names its weights.
    def _adapter(self, folder: str) -> str:
        """The adapter name of a LoRA folder, loaded on first use and again when its weights file changed (a
        resumed run's later checkpoint); beyond MAX_ADAPTERS the least recently used goes. Model thread only."""
        name = self._adapter_name(folder)
        try:
            stamp = (Path(folder) / LORA_FILE).stat().st_mtime_ns
        except OSError:
            raise UserError(f"the fine-tuned weights in {model_name(folder)} are gone: go back to the base weights") from None
        if self._adapters.get(folder) != stamp or name not in self.model.lora_folders:
            try:
                self.model.load_lora(folder, name)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                self._adapters.pop(folder, None)
                raise UserError(f"could not load the LoRA in {model_name(folder)}: {str(e).splitlines()[0]}") from None
            if self._stamps.setdefault(folder, stamp) != stamp:  # new weights under the same model id
                self.cache.forget(self.model.model_id)
                self._stamps[folder] = stamp
            self._adapters[folder] = stamp
        self._adapters.move_to_end(folder)
        while len(self._adapters) > MAX_ADAPTERS:
            old, _ = self._adapters.popitem(last=False)
            self.model.unload_lora(self._adapter_name(old))
        return name

    @staticmethod
    def _adapter_name(folder: str) -> str:
        return f"{TUNED_ADAPTER}_{hashlib.sha1(folder.encode()).hexdigest()[:12]}"

    def _use(self, weights: str | None) -> None:
        """Compute with these weights (a LoRA folder, or None = the base) from now on. Model thread only."""
        self.model.use_lora(None if weights is None else self._adapter(weights))

    def _run(self, session: Session, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the model thread, computing with the session's weights."""
        def call():
            self._use(session.weights)
            return fn(*args, **kwargs)
        return self.model_thread.run(call)

    def weights_id(self, session: Session) -> str:
        """The model id the session's calls compute with (what its stored pairs are labelled with)."""
        base = self.model.base_id  # as the model spells it: results carry the model's own id
        return base if session.weights is None else f"{base}+lora:{session.weights}"

    def weights_text(self, session: Session) -> str:
        """The line under the header: the weights this session computes with."""
        if session.weights is None:
            return f"This session computes with the base weights `{model_name(self.model_source)}`."
        return (f"This session computes with the fine-tuned LoRA `{model_name(session.weights)}` on "
                f"`{model_name(self.model_source)}` (other sessions keep their own weights).")
