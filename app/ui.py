"""The Gradio app: wiring, per-session state and views over AppService (no tensor math, no store calls here).

`build_demo` holds the shared state and the page-open events and calls one builder per tab: `header`,
`fuse_tab`, `dataset_tab`, `train_tab`, `ablations_tab`. A tab builder lays out its widgets and wires them to
the named handlers of its events class (widget values in, widget updates out; every action is a call on the
service). Every event has an api_name, so the app is scriptable with gradio_client (see README).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from types import SimpleNamespace

import gradio as gr

from dfusion_core.engine.config import FUSION_LAYER_PRESETS, FusionParams, MaskParams, SamplingParams
from dfusion_core.engine.schema import control_spec

from .service import (PAIR_COLUMNS, AppService, FusionCancelled, FuseControls, Session, UserError, check_prompt,
                      model_name, parse_seed)
from .views import (CHECKER_LEGEND, MASK_LEGEND, PREVIEW_STATUS, SUPERSEDED_STATUS, ablation_plot, candidate_caption,
                    enlarge, heat_overlay, mask_overlay, pair_notes, pick_note, progress_bar, prompt_notes_text, score_text,
                    threshold_slider, training_plot)

log = logging.getLogger("dfusion.app")

SHORTCUTS = """
<script>
// The label shortcuts work wherever the focus is, except while typing: a text box (input of a text or number
// type, textarea, contenteditable) keeps its keys. A focused checkbox, radio, slider or button does not.
const DFUSION_TYPING = new Set(['text', 'number', 'search', 'email', 'url', 'password', 'tel', 'date', 'time',
                                'datetime-local', 'month', 'week']);
function dfusionTyping(t) {
  if (!t) return false;
  if (t.isContentEditable || t.tagName === 'TEXTAREA') return true;
  return t.tagName === 'INPUT' && DFUSION_TYPING.has((t.type || 'text').toLowerCase());
}
document.addEventListener('keydown', (e) => {
  if (dfusionTyping(e.target) || e.ctrlKey || e.metaKey || e.altKey) return;
  const ids = {'1': 'label-target', '2': 'label-base', '3': 'label-tie', '4': 'label-skip', 'z': 'label-undo'};
  const id = ids[e.key.toLowerCase()];
  if (!id) return;
  const el = document.getElementById(id);
  if (el) { e.preventDefault(); (el.tagName === 'BUTTON' ? el : el.querySelector('button') || el).click(); }
});
// A slider moved with the keyboard (arrows, Page Up / Down, Home / End) ends its move when the key is let go:
// gradio's range input fires its "release" on pointerup only, so the key's end is sent as one.
const DFUSION_SLIDER_KEYS = new Set(['ArrowLeft', 'ArrowRight', 'ArrowUp', 'ArrowDown', 'PageUp', 'PageDown',
                                     'Home', 'End']);
document.addEventListener('keyup', (e) => {
  const t = e.target;
  if (t && t.tagName === 'INPUT' && t.type === 'range' && DFUSION_SLIDER_KEYS.has(e.key) && !t.disabled) {
    t.dispatchEvent(new PointerEvent('pointerup', {bubbles: true}));
  }
});
</script>
"""
CSS = """.pixelated img { image-rendering: pixelated; }
#threshold input:disabled { filter: grayscale(1); opacity: 0.45; }
#gallery .thumbnail-item.selected { --ring-color: transparent; border-color: var(--border-color-primary); }
#gallery .grid-wrap, #ablation-gallery .grid-wrap { min-height: 0; height: auto; max-height: none; }
#gallery .caption-label, #before-after .caption-label { white-space: normal; max-width: 100%; text-overflow: clip; }
div.validation-error { position: static !important; pointer-events: none; }
div.validation-error button { pointer-events: auto; }"""
# (a slider that does nothing looks it; the candidates' captions mark BASE and REF: the last click is not marked;
# a gallery is as tall as its rows: gradio's gallery keeps a 450 px minimum, an empty band under one row;
# captions wrap: gradio cuts them at 80% of a thumbnail, which hid the scores of BASE and REF; a refused input's
# message takes its own line in the control instead of lying over its top right corner, where a slider's number
# box is, and lets clicks through to the control)
# Small images shown large with crisp pixels, sent as PNG: exact pixels, and about 3x faster to encode than
# gradio's default WebP (4.7 vs 13.6 ms for a 256 px image here).
PIXELS = {"elem_classes": ["pixelated"], "format": "png"}
# Fusions (Fuse and the live re-fusions) running at once, app-wide. Each waits for the one model thread; what
# concurrency buys is that a session's newer request starts at once and stops its older one at the older's next
# step (Session.fusions), so moving a slider again never waits behind stale work.
FUSION_CONCURRENCY = 16
# Re-fuse live when one of these Fuse controls moves: (widget name, its event, the endpoint's suffix).
LIVE_CONTROLS = [("threshold", "release", "threshold"), ("start_step", "release", "start_step"),
                 ("end_step", "release", "end_step"), ("threshold_mode", "input", "threshold_mode"),
                 ("layers", "input", "layers"), ("resize", "input", "resize"), ("use_mask", "input", "use_mask"),
                 ("keywords", "input", "keywords"), ("combine", "input", "combine"),
                 ("union_base", "input", "union_base"), ("dilate", "release", "dilate"),
                 ("hold_outside", "input", "hold_outside")]
# The inputs of /fuse and of every live re-fusion, in order (the endpoints' parameters): the session, then the
# controls FuseControls names (so a handler takes them as one value).
FUSE_INPUTS = ["state", *(f.name for f in fields(FuseControls))]
# The fusion step sliders cannot cross: moving one past the other takes the other along (in the page, before
# the re-fusion reads them). (the slider that moved, the one that follows, how it follows)
STEP_FOLLOW = [("start_step", "end_step", "(s, e) => Math.max(s, e)"),
               ("end_step", "start_step", "(s, e) => Math.min(s, e)")]


def fuse_controls(fn):
    """Give a handler that takes (self, sess, *values) the named parameters of FuseControls, so gradio's API and
    its validation errors name each control ('- prompt: the prompt is empty'), as a hand-written signature did."""
    sig = inspect.signature(fn)
    params = [q for q in sig.parameters.values() if q.kind is not q.VAR_POSITIONAL]
    params += [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default)
               for f in fields(FuseControls)]
    fn.__signature__ = sig.replace(parameters=params)
    return fn


def setting_control(cls, name: str, value, **kw):
    """A Fuse control made from its setting's schema (engine/schema: label, choices, element id): a radio over the
    choices, a checkbox for a flag, else a slider; `kw` adds what the schema leaves to the page (a range)."""
    spec = control_spec(cls, name)
    common = {"label": spec["label"], "elem_id": spec["elem_id"], "value": value, **kw}
    if spec["choices"]:
        return gr.Radio(list(spec["choices"]), **common)
    if isinstance(spec["default"], bool):
        return gr.Checkbox(**common)
    return gr.Slider(**common)


class Refusals(dict):
    """{control: message} of what the service refuses, found before a model call (an event's validator)."""

    def test(self, name: str, fn, *args):
        """fn(*args), or None with its refusal kept on the control it names (UserError.widget), else on `name`."""
        try:
            return fn(*args)
        except UserError as err:
            self.setdefault(err.widget or name, str(err))

    def validators(self, names) -> list:
        """One gr.validate per input of the event, in order: its message, or valid."""
        return [gr.validate(name not in self, self.get(name, "")) for name in names]


@contextlib.contextmanager
def _reported(name: str):
    """UserError -> a toast with its message; anything else -> a short toast, logged with its traceback. A fusion
    a newer one superseded passes through (its handler says so)."""
    try:
        yield
    except UserError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except (gr.Error, FusionCancelled):
        raise
    except Exception as e:  # noqa: BLE001 - the UI must stay up
        log.exception("unexpected error in %s", name)
        raise gr.Error(f"internal error ({type(e).__name__}): {e}", print_exception=False) from None


def guarded(fn):
    """A handler whose errors reach the screen as toasts (_reported); a generator's too, while it streams."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streaming(*args):
            with _reported(fn.__name__):
                yield from fn(*args)
        return streaming

    @functools.wraps(fn)
    def wrapper(*args):
        with _reported(fn.__name__):
            return fn(*args)
    return wrapper


def checked(listen, check, inputs: list, fn, outputs: list, **action):
    """listen(fn, inputs, outputs) with `check(*inputs)` run first as an event of its own without outputs: its
    refusal (a UserError) is a toast and no panel is replaced by an Error badge (an error raised by fn marks
    every output fn has). The API endpoint is fn itself, which refuses the same things: each service action calls
    the check it is given here."""
    def refusal(*values) -> None:  # what a check returns is not the page's (an event without outputs)
        check(*values)

    refusal.__name__ = getattr(check, "__name__", "check")
    # queued: the error of an unqueued event shows no toast
    first = listen(guarded(refusal), inputs, None, api_name=False, show_progress="hidden")
    return first.success(fn, inputs, outputs, **action)


# ---- the page ----------------------------------------------------------------------------------------
def build_demo(svc: AppService) -> gr.Blocks:
    """The whole app: one Session per visitor (gr.State), the tabs, then what runs when a page opens."""
    with gr.Blocks(title="dfusion - D-Fusion preference pairs") as demo:
        state = gr.State(Session())
        status = header(svc)
        weights = gr.Markdown(elem_id="session-weights")  # the weights this session computes with
        on_open = [fuse_tab(svc, state), dataset_tab(svc)]
        on_open += train_tab(svc, state, weights)
        ablations_tab(svc, state)
        for fn, inputs, outputs in on_open:  # registered after every tab's events, as they always were
            demo.load(fn, inputs, outputs, api_name=False)
        follow_loading(svc, status, on_open[0])
    return demo


def header(svc: AppService) -> gr.Markdown:
    """The title, the keyboard shortcuts (their script is SHORTCUTS, passed to launch(head=...)) and the model's
    status line (loading / ready / failed), which it returns."""
    # the base weights, named without this machine's absolute path; a session's own line follows
    gr.Markdown(f"## dfusion · D-Fusion pairs on `{model_name(svc.model_source)}`\n"
                "Sample candidates, pick a base and a reference, inspect the masks, move the threshold or the "
                "fusion steps and label the pair. Shortcuts: **1** prefer target · **2** prefer base · "
                "**3** tie · **4** skip · **z** undo.")
    return gr.Markdown(model_status_text(svc), elem_id="model-status")


def model_status_text(svc: AppService) -> str:
    """The model's status line: plain when ready, marked while loading, bold with a warning when it failed."""
    line = svc.model_status()
    if svc.ready:
        return line
    return f"⏳ {line}" if svc.load_error is None else f"⚠ **{line}**"


def follow_loading(svc: AppService, status: gr.Markdown, on_ready) -> None:
    """While the model loads behind the page, a timer updates the status line each second; when the model is
    ready (or failed) the timer stops and the Fuse tab's page-open event runs again (`on_ready`: the prompt's
    words, which need the tokenizer). A page opened later gets one tick, which says the model is ready."""
    fn, inputs, outputs = on_ready
    timer = gr.Timer(1.0, active=True)

    def on_tick(*values):
        if not svc.ready and svc.load_error is None:
            return (model_status_text(svc), *[gr.update()] * len(outputs), gr.Timer(active=True))
        after = fn(*values) if svc.ready else [gr.update()] * len(outputs)
        return (model_status_text(svc), *after, gr.Timer(active=False))
    timer.tick(on_tick, inputs, [status, *outputs, timer], api_name=False, queue=False, show_progress="hidden")


# ---- Fuse --------------------------------------------------------------------------------------------
class FuseEvents:
    """The Fuse tab's handlers."""

    def __init__(self, svc: AppService):
        self.svc = svc
        self._fusions = ThreadPoolExecutor(FUSION_CONCURRENCY, thread_name_prefix="dfusion-fusion")

    def word_choices(self, p):
        """Updates of the word picker and the keyword boxes for a prompt (empty for a prompt refused)."""
        try:
            choices, kws = self.svc.words(p)
        except UserError:
            return gr.update(choices=[], value=None), gr.update(choices=[], value=[])
        return (gr.update(choices=choices, value=kws[0] if kws else None),
                gr.update(choices=choices, value=kws))

    @guarded
    def on_prompt(self, p):
        return self.word_choices(p)

    @guarded
    def on_prompt_notes(self, p):
        """The warnings under the prompt: cut by the token limit, outside the model's world (see the service)."""
        return prompt_notes_text(self.svc.prompt_notes(p))

    @guarded
    def on_open(self, p):
        """A page opens (or the model becomes ready): the prompt's words and its warnings."""
        return (*self.word_choices(p), self.on_prompt_notes(p))

    @guarded
    def on_example(self, ex):
        if not ex:
            return gr.update(), gr.update(), gr.update()
        return (ex, *self.word_choices(ex))

    @guarded
    def on_steps(self, n):
        """A new number of steps: the range sliders span it, from the model's first fused step to the last."""
        n = int(n)
        first = min(self.svc.default_fusion.start_step, n)
        return (gr.update(maximum=n, value=first), gr.update(maximum=n, value=n),
                gr.update(maximum=n, value=n))

    @guarded
    def on_sample(self, sess, p, st, g, e, n, s0_):  # parameter names are the endpoints' keyword names: kept
        sess = self.svc.sample_candidates(sess, p, n, s0_, self.svc.sampling(st, g, e))
        base, ref = self.svc.suggested_seeds(sess)
        return (sess, self.candidates(sess, base, ref), str(base), str(ref), *self.word_choices(p),
                pick_note(sess.candidates, base, ref))

    def check_sample(self, sess, p, st, g, e, n, s0_):
        """The validator of /sample, as /fuse has one: a refused input gets its message and nothing on the page is
        replaced (a refusal raised by the handler covered the gallery, seeds and word lists with Error badges)."""
        bad = Refusals()
        if not self.svc.ready:
            bad["prompt"] = self.svc.model_status()
        else:
            bad.test("prompt", check_prompt, p)
            bad.test("steps", self.svc.sampling, st, g, e)
            bad.test("n_cand", self.svc.check_candidates, n)
            bad.test("first_seed", parse_seed, s0_, "first seed")
        return bad.validators(["state", "prompt", "steps", "guidance", "eta", "n_cand", "first_seed"])

    @staticmethod
    def candidates(sess, base, ref) -> list:
        """The gallery's items: each candidate with its caption, the pair's two marked 'base' / 'reference'."""
        roles = {}
        for role, seed in (("base", base), ("reference", ref)):
            try:
                roles[parse_seed(seed, role)] = role
            except UserError:  # a seed being typed: nothing to mark
                pass
        return [(enlarge(c.image, 128), candidate_caption(c, roles.get(c.seed))) for c in sess.candidates.values()]

    def marked_gallery(self, sess, base, ref):
        """The gallery redrawn with the pair marked and no thumbnail selected: it shows the pair, not the last click."""
        if sess is None or not sess.candidates:
            return gr.update()
        return gr.update(value=self.candidates(sess, base, ref), selected_index=None)

    @guarded
    def on_seeds(self, sess, base, ref):
        return self.marked_gallery(sess, base, ref)

    @guarded
    def on_pick(self, sess, which, base, ref, evt: gr.SelectData):
        seeds = list(sess.candidates)
        if evt.index is None or evt.index >= len(seeds):
            return gr.update(), gr.update(), gr.update()
        s = str(seeds[evt.index])
        base, ref = (base, s) if which == "reference" else (s, ref)
        return base, ref, self.marked_gallery(sess, base, ref)

    def overlays(self, sess, word):
        """(the word's attention over the reference or None, the fusion mask over the reference)."""
        ref = sess.result.reference_image
        heat = enlarge(heat_overlay(ref, self.svc.word_map(sess, word))) if word else None
        return heat, enlarge(mask_overlay(ref, self.svc.fused_mask(sess)))

    @guarded
    @fuse_controls
    def on_fuse(self, sess, *values):
        """/fuse: the controls (FUSE_INPUTS after the session) as one FuseControls value. Streams: the target's
        preview while it forms, then the pair."""
        yield from self.fusing(sess, FuseControls(*values))

    @guarded
    @fuse_controls
    def on_live(self, sess, *values):
        if sess.result is None:  # nothing fused yet: a control moved before the first fusion
            yield (sess, *[gr.update()] * 7, "move a control after the first fusion to see it live")
            return
        yield from self.fusing(sess, FuseControls(*values), live=True)

    def fusing(self, sess, c: FuseControls, live: bool = False):
        """Run the fusion beside this event and yield the target's preview each time one arrives (the status says
        which step), then the fused pair; a fusion superseded by a newer one of the session says so and ends."""
        previews = queue.SimpleQueue()
        job = self._fusions.submit(self.fused, sess, c, lambda *p: previews.put(p))
        job.add_done_callback(lambda _: previews.put(None))  # after the job's last preview: the end of the stream
        keep = (gr.skip(),) * 3
        while (item := previews.get()) is not None:
            step, n, image = item
            yield (*keep, enlarge(image), *keep, gr.skip(), PREVIEW_STATUS.format(step=step, n=n))
        try:
            out = job.result()
        except FusionCancelled:
            yield (*keep, *keep, gr.skip(), gr.skip(), SUPERSEDED_STATUS)
            return
        if live and out[0].same_pair:  # base, reference and their attention are unchanged: fewer images to send
            out = (out[0], gr.skip(), gr.skip(), *out[3:5], gr.skip(), *out[6:])
        yield out

    def fused(self, sess, c: FuseControls, preview=None) -> tuple:
        """Fuse (the service) and the Fuse outputs of the new pair."""
        with _reported("fuse"):
            sampling, fusion = self.svc.fuse_settings(c)
            t0 = time.perf_counter()
            sess = self.svc.fuse(sess, c.prompt, c.base_seed, c.ref_seed, sampling, fusion, preview=preview)
            took = time.perf_counter() - t0
            r = sess.result
            heat_im, mask_im = self.overlays(sess, c.words)
        how = "one batched run"
        if r.from_cache:
            how = "cache (target branch only" + (f", {r.steps_reused} of {r.sampling.num_steps} steps reused)"
                                                 if r.steps_reused else ")")
        coverage = self.svc.mask_coverage(sess)
        m = r.fusion.mask
        grown = f" (the base's grown {m.dilate_base} more)" if m.union_base and m.dilate_base else ""
        form = f" · reference ∪ base{grown}" * m.union_base + " · base held outside" * r.fusion.hold_outside
        first, last = r.fusion.step_range(r.sampling.num_steps)
        msg = (f"fused in {how} · keywords {', '.join(r.keywords)} · mask covers {coverage:.0%}{form} · "
               f"layers {r.fusion.layers} · steps {first}-{last} · {took:.2f} s")
        notes = pair_notes(coverage if r.fusion.use_mask else None, r.base_image, r.target_image)
        return (sess, enlarge(r.base_image), enlarge(r.reference_image), enlarge(r.target_image),
                (enlarge(r.base_image), enlarge(r.target_image)), heat_im, mask_im, score_text(sess.scores, notes),
                msg)

    @staticmethod
    def on_steps_view(sess):
        """The step sliders set to the range the target was fused with (whatever was typed or followed); left as
        they are while a newer fusion is on its way (they show what it was asked for)."""
        r = sess.result if sess is not None else None
        if r is None or sess.fusions.pending:
            return gr.update(), gr.update()
        return r.fusion.step_range(r.sampling.num_steps)

    # ---- before a fusion: the validator (gradio runs it first), the controls kept consistent -------------
    @fuse_controls
    def check(self, sess, *values):
        """The validator of /fuse: a message on each refused input, one gr.validate per FUSE_INPUTS entry.
        A refusal here keeps the last good outputs on the page (an error raised by the handler would cover
        every output with an error badge); gradio_client raises it as a ValidationError naming the inputs."""
        try:
            bad = self.problems(FuseControls(*values))
        except Exception:  # noqa: BLE001 - not a refusal: the handler runs and reports it (guarded)
            log.exception("the fuse validator failed")
            bad = {}
        return Refusals(bad).validators(FUSE_INPUTS)

    @fuse_controls
    def check_live(self, sess, *values):
        """The validator of the live re-fusions: nothing to refuse before the first fusion (on_live says so)."""
        if sess is None or sess.result is None:
            return [gr.validate(True, "")] * len(FUSE_INPUTS)
        return self.check(sess, *values)

    def problems(self, c: FuseControls) -> dict[str, str]:
        """{input name: message} for what the service would refuse, found without running the model; each
        message goes on the control the refused setting came from (UserError.widget)."""
        bad = Refusals()
        test = bad.test
        if not self.svc.ready:  # the model loads behind the page: said at the prompt, nothing else checked
            return {"prompt": self.svc.model_status()}
        prompt, sampling = test("prompt", check_prompt, c.prompt), test("steps", self.svc.sampling, c.steps,
                                                                          c.guidance, c.eta)
        seeds = test("base_seed", parse_seed, c.base_seed, "base seed"), test("ref_seed", parse_seed, c.ref_seed,
                                                                             "reference seed")
        if None not in seeds:
            test("ref_seed", self.svc.pair_seeds, c.base_seed, c.ref_seed)  # two different images
        n = sampling.num_steps if sampling else self.svc.default_sampling.num_steps
        test("threshold", self.svc.fusion, n, c.keywords, c.threshold_mode, c.threshold, c.start_step, c.end_step,
             c.layers, c.resize, c.use_mask, c.union_base, c.dilate, 0.0, c.combine, c.hold_outside)
        for name, words in (("keywords", c.keywords), ("words", [c.words] if c.words else None)):
            if prompt is not None and words and name not in bad:
                test(name, self.svc.check_keywords, prompt, words)
        return bad

    def threshold_view(self, sess, mode, thr, um, comb, coverage=None):
        """The threshold slider for a mode: its range over the current pair's keyword maps (see views)."""
        r = sess.result if sess is not None else None
        kmaps = [self.svc.word_map(sess, k) for k in r.keywords] if r is not None else None
        return gr.update(**threshold_slider(mode, thr, kmaps, comb or "mean", bool(um), coverage))

    @guarded
    def on_threshold_view(self, sess, mode, thr, um, comb):
        return self.threshold_view(sess, mode, thr, um, comb)

    @guarded
    def on_mode(self, sess, mode, thr, um, comb):
        """A new threshold mode: its slider, at the value giving about the current mask (then the re-fusion)."""
        r = sess.result if sess is not None else None
        keep = self.svc.mask_coverage(sess) if r is not None and r.fusion.use_mask else None
        return self.threshold_view(sess, mode, thr, um, comb, coverage=keep)

    @guarded
    def on_word(self, sess, word, prompt=None):
        """The word's attention over the reference, when the pair on show was fused from the prompt in the box;
        after the prompt changed it would be the old pair's reference, so the panel is emptied instead."""
        if sess.result is None or not word:
            return gr.update()
        if prompt is not None and " ".join(str(prompt).split()) != sess.result.prompt:
            return None
        return self.overlays(sess, word)[0]

    @guarded
    def on_traj(self, sess, k):
        return enlarge(self.svc.x0_image(sess, k))

    def labeller(self, lab):
        @guarded
        def on_label(sess):
            return self.svc.label(sess, lab)
        on_label.__name__ = f"label_{lab}"
        return on_label

    @guarded
    def on_undo(self, sess):
        return self.svc.undo(sess)


def fuse_tab(svc: AppService, state: gr.State):
    """Sample, pick, fuse, inspect, label. Returns the event to run when a page opens: the prompt's words."""
    examples, v = svc.example_prompts(), SimpleNamespace()
    with gr.Tab("Fuse"):
        _candidate_widgets(v, svc.default_sampling, examples, checker=svc.has_checker())
        _mask_widgets(v, svc.default_fusion, svc.default_sampling.num_steps)
        _result_widgets(v, svc.default_sampling.num_steps)
    ev = FuseEvents(svc)
    _wire_fuse(v, ev, state)
    return ev.on_open, [v.prompt], [v.words, v.keywords, v.notes]


def _candidate_widgets(v: SimpleNamespace, s0, examples: list[str], checker: bool = False) -> None:
    """Prompt and its warnings, sampling settings, the candidate gallery (with the checker's legend when the model
    has a checker) and the seed pair (widgets set on `v`)."""
    with gr.Row():
        v.prompt = gr.Textbox(label="Prompt", value=examples[0] if examples else "", scale=4, max_lines=2,
                              elem_id="prompt")
        v.example = gr.Dropdown(choices=examples, label="Examples (prompts this model can draw)", scale=2,
                                value=None)
    v.notes = gr.Markdown(elem_id="prompt-notes")  # why the model cannot draw the prompt as typed, if it cannot
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            v.steps = setting_control(SamplingParams, "num_steps", s0.num_steps, minimum=2, maximum=50, step=1)
            v.guidance = setting_control(SamplingParams, "guidance_scale", s0.guidance_scale, minimum=0, maximum=15,
                                         step=0.25)
            v.eta = setting_control(SamplingParams, "eta", s0.eta, minimum=0, maximum=1, step=0.05)
            v.n_cand = gr.Slider(2, 32, value=8, step=1, label="Candidates")
            v.first_seed = gr.Number(value=0, precision=0, label="First seed")
    v.sample_btn = gr.Button("Sample candidates", variant="primary", elem_id="sample")
    # rows=1 with height "auto" (and CSS): as tall as the candidates, no empty band under them
    v.gallery = gr.Gallery(label="Candidates - click one to set it as base or reference", columns=8, rows=1,
                           height="auto", allow_preview=False, **PIXELS, elem_id="gallery")
    gr.Markdown(CHECKER_LEGEND, visible=checker, elem_id="checker-legend")
    with gr.Row():
        v.click_sets = gr.Radio(["reference", "base"], value="reference", label="A click sets the")
        v.base_seed = gr.Textbox(value="0", label="Base seed", elem_id="base-seed")
        v.ref_seed = gr.Textbox(value="1", label="Reference seed", elem_id="ref-seed")
        v.fuse_btn = gr.Button("Fuse", variant="primary", elem_id="fuse")


def _mask_widgets(v: SimpleNamespace, f0, n_steps: int) -> None:
    """Words, keywords, threshold, step range, layers, the mask's form; beside them the word's heatmap and the
    mask. Every control starts at the model's fusion form `f0` (its dfusion.json over the paper's)."""
    m0 = f0.mask
    with gr.Row():
        with gr.Column(scale=1):
            v.words = gr.Radio(choices=[], label="Words (click one to see its attention)", elem_id="words")
            v.keywords = gr.CheckboxGroup(choices=[], label=control_spec(MaskParams, "keywords")["label"],
                                          elem_id="keywords")
            v.threshold_mode = setting_control(MaskParams, "threshold_mode", m0.threshold_mode)
            first = threshold_slider(m0.threshold_mode, m0.threshold)  # no map yet: each mode's whole range
            v.threshold = gr.Slider(first.get("minimum", 0.0), first.get("maximum", 1.0), value=m0.threshold,
                                    step=first.get("step", 0.01), label=first["label"],
                                    interactive=first["interactive"], elem_id="threshold")
            with gr.Row():
                v.start_step = setting_control(FusionParams, "start_step", min(f0.start_step, n_steps), minimum=1,
                                               maximum=n_steps, step=1)
                v.end_step = setting_control(FusionParams, "end_step", n_steps, minimum=1, maximum=n_steps, step=1)
            # a Radio, not a Dropdown: gradio's dropdown also fires its input event on blur, so one choice fused
            # twice (the second a cache hit, seconds on a busy machine)
            v.layers = setting_control(FusionParams, "layers",
                                       f0.layers if f0.layers in FUSION_LAYER_PRESETS else "mid+up")
            v.resize = setting_control(MaskParams, "resize", m0.resize)
            v.combine = setting_control(MaskParams, "combine", m0.combine)
            v.use_mask = setting_control(FusionParams, "use_mask", True)
            with gr.Row():
                v.union_base = setting_control(MaskParams, "union_base", m0.union_base)
                v.hold_outside = setting_control(FusionParams, "hold_outside", f0.hold_outside)
            v.dilate = setting_control(MaskParams, "dilate", m0.dilate, minimum=0, maximum=4, step=1)
        with gr.Column(scale=1):
            v.heat = gr.Image(label="Selected word's attention over the reference", **PIXELS,
                              interactive=False, elem_id="heat")
            v.mask_img = gr.Image(label="Fusion mask (mean over the fused steps)", **PIXELS,
                                  interactive=False, elem_id="mask")
            gr.HTML(MASK_LEGEND, elem_id="mask-legend")


def _result_widgets(v: SimpleNamespace, n_steps: int) -> None:
    """The three images, scores, base | target slider, the trajectory viewer, the label buttons, the status."""
    with gr.Row():
        v.base_img = gr.Image(label="Base", **PIXELS, interactive=False, elem_id="base")
        v.ref_img = gr.Image(label="Reference", **PIXELS, interactive=False, elem_id="reference")
        v.tgt_img = gr.Image(label="Target", **PIXELS, interactive=False, elem_id="target")
    v.scores_md = gr.Markdown(elem_id="scores")
    with gr.Row():
        v.compare = gr.ImageSlider(label="Base | target", **PIXELS, interactive=False)
        with gr.Column():
            v.traj_step = gr.Slider(1, n_steps, value=n_steps, step=1, label="Trajectory step", elem_id="traj-step")
            v.x0_img = gr.Image(label="Target's predicted image at that step (move the slider; a new fusion "
                                      "clears it)", **PIXELS, interactive=False, elem_id="x0")
    with gr.Row():
        v.label_buttons = {"target": gr.Button("Prefer target [1]", elem_id="label-target"),  # no default choice
                           "base": gr.Button("Prefer base [2]", elem_id="label-base"),
                           "tie": gr.Button("Tie [3]", elem_id="label-tie"),
                           "skip": gr.Button("Skip [4]", elem_id="label-skip")}
        v.undo_btn = gr.Button("Undo [z]", elem_id="label-undo")
    v.status = gr.Markdown(elem_id="status")


def _wire_fuse(v: SimpleNamespace, ev: FuseEvents, state: gr.State) -> None:
    v.state = state
    v.prompt.submit(ev.on_prompt, [v.prompt], [v.words, v.keywords], api_name="words")
    # The words follow the prompt as it is typed (not when the box is left: that answer would arrive after a
    # click on Fuse, which leaves the box, and erase the message the click put on the prompt).
    v.prompt.change(ev.on_prompt, [v.prompt], [v.words, v.keywords], api_name=False, queue=False,
                    show_progress="hidden", trigger_mode="always_last")
    v.example.change(ev.on_example, [v.example], [v.prompt, v.words, v.keywords], api_name="example")
    v.steps.release(ev.on_steps, [v.steps], [v.start_step, v.end_step, v.traj_step], api_name="steps")
    sample_inputs = [state, v.prompt, v.steps, v.guidance, v.eta, v.n_cand, v.first_seed]
    # an accepted Sample first empties the gallery (the browser kept the previous prompt's thumbnails under the
    # new captions while the new images loaded); a refused one changes nothing
    v.sample_btn.click(lambda *_: [], sample_inputs, [v.gallery], api_name=False, validator=ev.check_sample,
                       preprocess=False, show_progress="hidden").success(  # (queued: gradio validates queued events)
        ev.on_sample, sample_inputs, [state, v.gallery, v.base_seed, v.ref_seed, v.words, v.keywords, v.status],
        api_name="sample", validator=ev.check_sample, preprocess=False)  # raw values: the validator's messages
    v.gallery.select(ev.on_pick, [state, v.click_sets, v.base_seed, v.ref_seed], [v.base_seed, v.ref_seed, v.gallery],
                     api_name=False)
    for box in (v.base_seed, v.ref_seed):  # a typed seed: the gallery marks the new pair
        box.input(ev.on_seeds, [state, v.base_seed, v.ref_seed], [v.gallery], api_name=False, queue=False,
                  trigger_mode="always_last", show_progress="hidden")
    v.prompt.change(ev.on_prompt_notes, [v.prompt], [v.notes], api_name="prompt_notes", queue=False,
                    show_progress="hidden", trigger_mode="always_last")
    _wire_fusion(v, ev)
    v.words.change(ev.on_word, [state, v.words, v.prompt], [v.heat], api_name="word_heatmap")
    svc = ev.svc
    checked(v.traj_step.release, lambda sess, _: svc.fused_result(sess), [state, v.traj_step], ev.on_traj, [v.x0_img],
            api_name="trajectory")
    for lab, btn in v.label_buttons.items():
        checked(btn.click, functools.partial(svc.check_label, label=lab), [state], ev.labeller(lab), [v.status],
                api_name=f"label_{lab}")
    checked(v.undo_btn.click, svc.check_undo, [state], ev.on_undo, [v.status], api_name="undo")


def _wire_fusion(v: SimpleNamespace, ev: FuseEvents) -> None:
    """/fuse and the live re-fusions, each checked first by its validator. Some controls first adjust others
    in the page (STEP_FOLLOW; a new threshold mode gets its slider); after every fusion the threshold slider
    is redrawn over the new pair's maps."""
    inputs = [getattr(v, name) for name in FUSE_INPUTS]
    outputs = [v.state, v.base_img, v.ref_img, v.tgt_img, v.compare, v.heat, v.mask_img, v.scores_md, v.status]
    slider = {"fn": ev.on_threshold_view, "inputs": [v.state, v.threshold_mode, v.threshold, v.use_mask, v.combine],
              "outputs": [v.threshold], "queue": False, "show_progress": "hidden"}
    # preprocess=False: the widgets' plain values, which the validator checks with the service's messages
    # (e.g. "keyword 'horse' is not in the prompt"); gradio's own choice check would fail before the validator
    # and its message reach no one (a bare 400).
    # a new fusion clears the trajectory's predicted image: it showed the previous target
    clear = {"fn": lambda: None, "inputs": None, "outputs": [v.x0_img], "queue": False, "show_progress": "hidden",
             "api_name": False}
    fused = v.fuse_btn.click(ev.on_fuse, inputs, outputs, api_name="fuse", validator=ev.check, preprocess=False,
                             concurrency_id="fusion", concurrency_limit=FUSION_CONCURRENCY)
    steps = {"fn": ev.on_steps_view, "inputs": [v.state], "outputs": [v.start_step, v.end_step], "queue": False,
             "show_progress": "hidden", "api_name": False}
    fused.success(**slider, api_name=False)
    fused.success(**clear)
    fused.success(**steps)
    first = {moved: {"fn": None, "inputs": [v.start_step, v.end_step], "outputs": [getattr(v, other)], "js": js}
             for moved, other, js in STEP_FOLLOW}
    first["threshold_mode"] = {**slider, "fn": ev.on_mode}
    for widget, event, name in LIVE_CONTROLS:
        listen = getattr(getattr(v, widget), event)
        live = {"fn": ev.on_live, "inputs": inputs, "outputs": outputs, "api_name": f"refuse_{name}",
                "validator": ev.check_live, "preprocess": False, "concurrency_id": "fusion",
                "concurrency_limit": FUSION_CONCURRENCY}
        # "multiple": a move made while a fusion runs is sent at once and stops that fusion (see FUSION_CONCURRENCY)
        if widget in first:
            dep = listen(**first[widget], api_name=False, trigger_mode="multiple").then(**live)
        else:
            dep = listen(**live, trigger_mode="multiple")
        dep.success(**slider, api_name=False)
        dep.success(**clear)
        dep.success(**steps)


# ---- Dataset -----------------------------------------------------------------------------------------
class DatasetEvents:
    """The Dataset tab's handlers: the labelled set, through the service."""

    def __init__(self, svc: AppService):
        self.svc = svc

    @guarded
    def on_table(self, text, lab):
        return self.svc.list_pairs(text, lab)

    @guarded
    def on_row(self, evt: gr.SelectData, df):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        pid = df.iloc[row, 0] if hasattr(df, "iloc") else df[row][0]
        base, target = self.svc.pair_images(pid)
        return pid, enlarge(base), enlarge(target)

    @guarded
    def on_relabel(self, pid, lab, text, lf):
        return self.svc.relabel(pid, lab), self.on_table(text, lf)

    @guarded
    def on_delete(self, pid, text, lf, deleted):
        msg = self.svc.delete_pair(pid, deleted)
        return msg, self.on_table(text, lf), None, None, deleted

    @guarded
    def on_undo_delete(self, deleted, text, lf):
        return self.svc.undo_delete(deleted), self.on_table(text, lf), deleted

    @guarded
    def on_export(self):
        return self.svc.export()

    @guarded
    def on_import(self, path, text, lf):
        """The import's report; a refused archive is said in its place (an Error badge over the previous
        import's report read as if that one had failed) and the table stays."""
        try:
            report = self.svc.import_pairs(path)
        except UserError as e:
            return f"import failed: {e}", gr.update()
        return report, self.on_table(text, lf)


def dataset_tab(svc: AppService):
    """Browse, relabel, delete (and undo), export (a download) and import (an upload) pairs. Returns the event to
    run when a page opens: the table (which also follows the tab being opened and every action)."""
    v = SimpleNamespace()
    with gr.Tab("Dataset", elem_id="dataset-tab") as v.tab:
        _dataset_widgets(v)
    _wire_dataset(v, DatasetEvents(svc))
    return v.ev.on_table, v.query, [v.table]


def _dataset_widgets(v: SimpleNamespace) -> None:
    with gr.Row():
        v.filt = gr.Textbox(label="Prompt contains", scale=3)
        v.label_filt = gr.Dropdown(["any", "target", "base", "tie"], value="any", label="Label", scale=1)
        v.refresh = gr.Button("Refresh", scale=1, elem_id="refresh")
    v.table = gr.Dataframe(headers=list(PAIR_COLUMNS), interactive=False, elem_id="pairs-table")
    with gr.Row():
        v.pick_id = gr.Textbox(label="Pair id (click a row)", scale=3)
        v.new_label = gr.Dropdown(["target", "base", "tie"], value="target", label="New label", scale=1)
        v.relabel_btn = gr.Button("Relabel", scale=1)
        v.delete_btn = gr.Button("Delete", variant="stop", scale=1, elem_id="delete-pair")
        v.undo_btn = gr.Button("Undo delete", scale=1, elem_id="undo-delete")
    with gr.Row():
        v.ds_base = gr.Image(label="Base", **PIXELS, interactive=False)
        v.ds_target = gr.Image(label="Target", **PIXELS, interactive=False)
    with gr.Row():
        v.export_btn = gr.Button("Export the set (.zip)", scale=1, elem_id="export")
        v.export_file = gr.File(label="Download: Parquet (caption / jpg_0 / jpg_1 / label_0) + pair folder "
                                "(trajectories)", interactive=False, scale=2, elem_id="export-file")
        v.import_btn = gr.UploadButton("Import an archive (.zip / .tar / .tar.gz of an export or a pair folder)",
                                       file_types=[".zip", ".tar", ".gz", ".tgz"], type="filepath", scale=2,
                                       elem_id="import")
    v.ds_status = gr.Markdown(elem_id="dataset-status")
    v.deleted = gr.State([])  # this page's deleted pairs, newest last: 'Undo delete' restores them


def _wire_dataset(v: SimpleNamespace, ev: DatasetEvents) -> None:
    v.ev, v.query = ev, [v.filt, v.label_filt]
    v.refresh.click(ev.on_table, v.query, [v.table], api_name="list_pairs")
    v.tab.select(ev.on_table, v.query, [v.table], api_name=False)  # labels made in the Fuse tab show up at once
    v.filt.submit(ev.on_table, v.query, [v.table], api_name=False)
    v.label_filt.change(ev.on_table, v.query, [v.table], api_name=False)
    v.table.select(ev.on_row, [v.table], [v.pick_id, v.ds_base, v.ds_target], api_name=False)
    svc, picked = ev.svc, lambda pid, *_: ev.svc.picked(pid)
    checked(v.relabel_btn.click, picked, [v.pick_id, v.new_label, *v.query], ev.on_relabel, [v.ds_status, v.table],
            api_name="relabel")
    checked(v.delete_btn.click, picked, [v.pick_id, *v.query, v.deleted], ev.on_delete,
            [v.ds_status, v.table, v.ds_base, v.ds_target, v.deleted], api_name="delete_pair")
    checked(v.undo_btn.click, lambda deleted, *_: svc.check_undo_delete(deleted), [v.deleted, *v.query],
            ev.on_undo_delete, [v.ds_status, v.table, v.deleted], api_name="undo_delete")
    checked(v.export_btn.click, svc.check_export, [], ev.on_export, [v.ds_status, v.export_file], api_name="export")
    v.import_btn.upload(ev.on_import, [v.import_btn, *v.query], [v.ds_status, v.table], api_name="import")


# ---- Train -------------------------------------------------------------------------------------------
class TrainEvents:
    """The Train tab's handlers: a TrainConfig from the widgets, the session's background fine-tune, its log,
    the weights the session computes with."""

    def __init__(self, svc: AppService):
        self.svc = svc

    def status(self, sess):
        """(state line, progress bar, plot) of the session's fine-tune: what the panel always shows."""
        msg, rows, frac = self.svc.train_status(sess)
        return msg, progress_bar(frac), (training_plot(rows) if rows else None)

    @guarded
    def on_train(self, sess, a_, r_, lr_, b_, st_):  # (algorithm, rank, lr, beta, steps); names are the API's: kept
        sess, msg = self.svc.train_start(sess, self.svc.train_config(a_, r_, lr_, b_, st_))
        return (sess, msg, *self.status(sess))

    def check_train(self, sess, a_, r_, lr_, b_, st_):
        self.svc.train_plan(sess, self.svc.train_config(a_, r_, lr_, b_, st_))

    def check_rounds(self, sess, a_, r_, lr_, rounds, arm, prompts, cands):
        self.svc.on_policy_plan(sess, self.svc.on_policy_config(a_, r_, lr_, rounds, arm), prompts, cands)

    def check_compare(self, sess, text):
        self.svc.trained_folder(sess)
        self.svc.before_after_prompts(sess, text)

    @guarded
    def on_rounds(self, sess, a_, r_, lr_, rounds, arm, prompts, cands):  # names are the API's: kept
        cfg = self.svc.on_policy_config(a_, r_, lr_, rounds, arm)
        sess, msg = self.svc.train_on_policy_start(sess, cfg, prompts, cands)
        return (sess, msg, *self.status(sess))

    @guarded
    def on_cancel(self, sess):
        return (self.svc.train_cancel(sess), *self.status(sess))

    @guarded
    def on_resume(self, sess):
        return (self.svc.train_resume(sess), *self.status(sess))

    @guarded
    def on_load(self, sess):
        sess, msg = self.svc.load_trained(sess)
        return sess, msg, self.svc.weights_text(sess)

    @guarded
    def on_unload(self, sess):
        sess, msg = self.svc.unload_trained(sess)
        return sess, msg, self.svc.weights_text(sess)

    def on_weights(self, sess):
        return self.svc.weights_text(sess)

    def on_tick(self, sess):
        return self.status(sess)

    @guarded
    def on_compare(self, sess, text):
        """Before / after on the typed prompts, or held-out ones (shown in the box); one gallery row a prompt."""
        prompts = self.svc.before_after_prompts(sess, text)
        items = self.svc.before_after(sess, prompts)
        rows = " · ".join(f"{i + 1}. {p}" for i, p in enumerate(prompts))
        return [(enlarge(im, 128), cap) for im, cap in items], "\n".join(prompts), f"Rows: {rows}"

    @guarded
    def on_compare_plan(self, sess, text):
        """What Before / after will cost, said before it runs (and which prompts an empty box means)."""
        prompts = self.svc.before_after_prompts(sess, text)
        which = "" if str(text or "").strip() else "held-out prompts of the trained families: "
        return which + self.svc.before_after_estimate(len(prompts))


def train_tab(svc: AppService, state: gr.State, weights: gr.Markdown) -> list:
    """Start / cancel / resume this session's LoRA fine-tune, follow it, make this session fuse with it, compare
    before / after. Returns the events to run when a page opens: the weights line, the job's state."""
    with gr.Tab("Train"):
        gr.Markdown("Fine-tune a LoRA on the labelled pairs in a background process; the plot follows its log. "
                    f"Each run writes its log, checkpoints and LoRA weights to a folder of its own under "
                    f"`{model_name(svc.runs_dir)}`. The fine-tune is this session's: *Load into the Fuse view* "
                    "makes this session (no other) fuse and label with it.")
        with gr.Row():
            algo = gr.Dropdown(["dpo", "traj-dpo", "ddpo", "dpok"], value="dpo", label="Algorithm")
            rank = gr.Number(value=4, precision=0, label="LoRA rank")
            lr = gr.Number(value=1e-4, label="Learning rate")
            beta = gr.Number(value=5000, label="beta (dpo: 5000, beta/2 convention; traj-dpo: 0.1)")
            tsteps = gr.Number(value=100, precision=0, label="Steps")
        with gr.Row():
            train_btn = gr.Button("Start", variant="primary", elem_id="train-start")
            cancel_btn, resume_btn = gr.Button("Cancel", variant="stop"), gr.Button("Resume")
            load_btn, unload_btn = gr.Button("Load into the Fuse view"), gr.Button("Back to the base weights")
            compare_btn = gr.Button("Before / after on held-out prompts")
        with gr.Accordion("On-policy rounds (DDPO / DPOK): fresh samples from the LoRA every round", open=False):
            gr.Markdown("Each round samples candidates for every prompt from the LoRA being trained, pairs them "
                        "(*dfusion*: fused targets against their bases; *random*: plain samples paired at random), "
                        "scores them with the app's scorer and trains on them. LoRA rank and learning rate from "
                        "the row above.")
            with gr.Row():
                rl_prompts = gr.Textbox("\n".join(svc.example_prompts()[:3]), lines=3, label="Prompts, one per line")
                with gr.Column():
                    rl_algo = gr.Dropdown(["ddpo", "dpok"], value="ddpo", label="Algorithm (rounds)",
                                          elem_id="train-rounds-algo")
                    rounds = gr.Number(value=3, precision=0, label="Rounds")
                    arm = gr.Dropdown(["dfusion", "random"], value="dfusion", label="Pairs each round")
                    cands = gr.Number(value=8, precision=0, label="Candidates per prompt and round")
            rounds_btn = gr.Button("Start rounds", elem_id="train-rounds")
        train_msg = gr.Markdown(elem_id="train-message")  # the last action's message: stays until the next
        train_status = gr.Markdown(elem_id="train-status")  # the job's state, step, loss and folder, kept current
        train_progress = gr.HTML(progress_bar(0.0), elem_id="train-progress")
        train_plot = gr.Plot(label="Training curves (each panel names its quantity)")  # a long label was cut
        with gr.Row():
            ba_prompts = gr.Textbox(lines=3, label="Before / after prompts, one per line (empty: held-out prompts of "
                                    "the trained families)", elem_id="before-after-prompts")
            ba_plan = gr.Markdown(elem_id="before-after-plan")
        # one row a prompt: before seed 0, seed 1, after seed 0, seed 1 (short captions, shown whole)
        before_after = gr.Gallery(label="Before (base weights) / after (this session's LoRA), fixed seeds", columns=4,
                                  **PIXELS, elem_id="before-after")
        ba_rows = gr.Markdown(elem_id="before-after-rows")
        timer = gr.Timer(2.0)
    ev, shown = TrainEvents(svc), [train_status, train_progress, train_plot]
    trained = checked(train_btn.click, ev.check_train, [state, algo, rank, lr, beta, tsteps], ev.on_train,
                      [state, train_msg, *shown], api_name="train")
    rounds_started = checked(rounds_btn.click, ev.check_rounds, [state, rl_algo, rank, lr, rounds, arm, rl_prompts, cands],
                             ev.on_rounds, [state, train_msg, *shown], api_name="train_on_policy")
    checked(cancel_btn.click, svc.running_job, [state], ev.on_cancel, [train_msg, *shown], api_name="train_cancel")
    checked(resume_btn.click, svc.resumable_job, [state], ev.on_resume, [train_msg, *shown], api_name="train_resume")
    checked(load_btn.click, svc.trained_folder, [state], ev.on_load, [state, train_msg, weights], api_name="load_trained")
    checked(unload_btn.click, svc.loaded_weights, [state], ev.on_unload, [state, train_msg, weights],
            api_name="unload_trained")
    # a fine-tune started makes the shown before / after stale: it compared the previous LoRA
    for started in (trained, rounds_started):
        started.success(lambda: (None, ""), None, [before_after, ba_rows], queue=False, api_name=False,
                        show_progress="hidden")
    checked(compare_btn.click, ev.check_compare, [state, ba_prompts], ev.on_compare, [before_after, ba_prompts, ba_rows],
            api_name="before_after")
    ba_prompts.change(ev.on_compare_plan, [state, ba_prompts], [ba_plan], api_name=False, show_progress="hidden")
    timer.tick(ev.on_tick, [state], shown, api_name="train_status", show_progress="hidden")
    return [(ev.on_weights, [state], [weights]), (ev.on_tick, [state], shown),
            (ev.on_compare_plan, [state, ba_prompts], [ba_plan])]


# ---- Ablations ---------------------------------------------------------------------------------------
def ablations_tab(svc: AppService, state: gr.State) -> None:
    """The current pair under early / late / all fusion steps, with and without the mask, three thresholds."""
    with gr.Tab("Ablations"):
        gr.Markdown("For the current pair: early / late / all fusion steps, with and without the mask, and "
                    "three relative thresholds - from the reference cache.")
        abl_btn = gr.Button("Run the ablation grid", variant="primary", elem_id="ablate")
        # every cell shown: rows of five, as tall as they need (a fixed height clipped the second row)
        abl_gallery = gr.Gallery(label="Targets", columns=5, **PIXELS, height="auto", allow_preview=False,
                                 elem_id="ablation-gallery")
        abl_plot = gr.Plot(label="Change against the base, inside vs outside the mask", elem_id="ablation-plot")

    @guarded
    def on_ablate(sess):
        cells = svc.ablation(sess)
        items = [(enlarge(c.image, 128), c.label + (f" · {c.score:.3f}" if c.score is not None else "")) for c in cells]
        return items, ablation_plot(cells)

    checked(abl_btn.click, svc.ablation_pair, [state], on_ablate, [abl_gallery, abl_plot], api_name="ablation")
