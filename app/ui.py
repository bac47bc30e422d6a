"""The Gradio app: wiring, per-session state and views over AppService (no tensor math here).

Every event has an api_name, so the app is scriptable with gradio_client (see README).
"""
from __future__ import annotations

import functools
import logging
import time

import gradio as gr
import numpy as np

from dfusion_core.config import COMBINE_MODES, FUSION_LAYER_PRESETS, RESIZE_MODES, THRESHOLD_MODES
import dfusion_core.shapesworld  # noqa: F401  (registers the shipped world's prompt lists)
from dfusion_core.prompt_sets import load_prompt_set

from .service import AppService, Session, UserError
from .views import ablation_plot, candidate_caption, enlarge, heat_overlay, mask_overlay, score_text, training_plot

log = logging.getLogger("dfusion.app")

SHORTCUTS = """
<script>
document.addEventListener('keydown', (e) => {
  const t = e.target;
  if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.isContentEditable)) return;
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const ids = {'1': 'label-target', '2': 'label-base', '3': 'label-tie', '4': 'label-skip', 'z': 'label-undo'};
  const id = ids[e.key.toLowerCase()];
  if (!id) return;
  const el = document.getElementById(id);
  if (el) { e.preventDefault(); (el.tagName === 'BUTTON' ? el : el.querySelector('button') || el).click(); }
});
</script>
"""
CSS = ".pixelated img { image-rendering: pixelated; }"
# Small images shown large with crisp pixels, sent as PNG: exact pixels, and about 3x faster to encode than
# gradio's default WebP (4.7 vs 13.6 ms for a 256 px image here).
PIXELS = {"elem_classes": ["pixelated"], "format": "png"}


def guarded(fn):
    """UserError -> a toast with its message; anything else -> a short toast, logged with its traceback."""
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - the UI must stay up
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"internal error ({type(e).__name__}): {e}", print_exception=False) from None
    return wrapper


def example_prompts() -> list[str]:
    out = []
    for spec in ("shapesworld:attribute:test", "shapesworld:spatial:test", "shapesworld:action:test",
                 "paper:action:train", "paper:attribute:train", "paper:spatial:train"):
        try:
            out += [e.prompt for e in load_prompt_set(spec)[:4]]
        except ValueError:
            continue
    return out


def build_demo(svc: AppService) -> gr.Blocks:
    examples = example_prompts()
    s0, m0 = svc.default_sampling, svc.default_mask
    n_steps = s0.num_steps

    with gr.Blocks(title="dfusion - D-Fusion preference pairs") as demo:
        state = gr.State(Session())
        gr.Markdown(f"## dfusion · D-Fusion pairs on `{svc.model.model_id}`\n"
                    "Sample candidates, pick a base and a reference, inspect the masks, move the threshold or the "
                    "fusion steps and label the pair. Shortcuts: **1** prefer target · **2** prefer base · "
                    "**3** tie · **4** skip · **z** undo.")
        with gr.Tab("Fuse"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", value=examples[0] if examples else "", scale=4, max_lines=2,
                                    elem_id="prompt")
                example = gr.Dropdown(choices=examples, label="Examples", scale=2, value=None)
            with gr.Accordion("Sampling", open=False):
                with gr.Row():
                    steps = gr.Slider(2, 50, value=n_steps, step=1, label="DDIM steps")
                    guidance = gr.Slider(0, 15, value=s0.guidance_scale, step=0.25, label="Guidance (CFG)")
                    eta = gr.Slider(0, 1, value=s0.eta, step=0.05, label="eta (1 = stochastic)")
                    n_cand = gr.Slider(2, 32, value=8, step=1, label="Candidates")
                    first_seed = gr.Number(value=0, precision=0, label="First seed")
            sample_btn = gr.Button("Sample candidates", variant="primary", elem_id="sample")
            gallery = gr.Gallery(label="Candidates - click one to set it as base or reference", columns=8,
                                 height=220, allow_preview=False, **PIXELS, elem_id="gallery")
            with gr.Row():
                click_sets = gr.Radio(["reference", "base"], value="reference", label="A click sets the")
                base_seed = gr.Textbox(value="0", label="Base seed", elem_id="base-seed")
                ref_seed = gr.Textbox(value="1", label="Reference seed", elem_id="ref-seed")
                fuse_btn = gr.Button("Fuse", variant="primary", elem_id="fuse")
            with gr.Row():
                with gr.Column(scale=1):
                    words = gr.Radio(choices=[], label="Words (click one to see its attention)", elem_id="words")
                    keywords = gr.CheckboxGroup(choices=[], label="Mask keywords", elem_id="keywords")
                    threshold_mode = gr.Radio(list(THRESHOLD_MODES), value=m0.threshold_mode, label="Threshold mode")
                    threshold = gr.Slider(0.0, 1.0, value=m0.threshold, step=0.01,
                                          label="Threshold (absolute: attention prob; relative: x max; area: fraction)")
                    with gr.Row():
                        start_step = gr.Slider(1, n_steps, value=3, step=1, label="Fuse from step")
                        end_step = gr.Slider(1, n_steps, value=n_steps, step=1, label="to step")
                    layers = gr.Dropdown(list(FUSION_LAYER_PRESETS), value="mid+up", label="Fusion layers")
                    resize = gr.Radio(list(RESIZE_MODES), value=m0.resize, label="Mask resize")
                    combine = gr.Radio(list(COMBINE_MODES), value=m0.combine,
                                       label="Keywords combined by (mean map, or union of one mask each: the paper's)")
                    use_mask = gr.Checkbox(value=True, label="Use the mask (off = global fusion)")
                with gr.Column(scale=1):
                    heat = gr.Image(label="Selected word's attention over the reference", **PIXELS,
                                    interactive=False, elem_id="heat")
                    mask_img = gr.Image(label="Fusion mask (mean over the fused steps)", **PIXELS,
                                        interactive=False, elem_id="mask")
            with gr.Row():
                base_img = gr.Image(label="Base (loser)", **PIXELS, interactive=False)
                ref_img = gr.Image(label="Reference", **PIXELS, interactive=False)
                tgt_img = gr.Image(label="Target (winner)", **PIXELS, interactive=False,
                                   elem_id="target")
            scores_md = gr.Markdown(elem_id="scores")
            with gr.Row():
                compare = gr.ImageSlider(label="Base | target", **PIXELS, interactive=False)
                with gr.Column():
                    traj_step = gr.Slider(1, n_steps, value=n_steps, step=1, label="Trajectory step")
                    x0_img = gr.Image(label="Target's predicted image at that step", **PIXELS,
                                      interactive=False)
            with gr.Row():
                b_target = gr.Button("Prefer target [1]", elem_id="label-target", variant="primary")
                b_base = gr.Button("Prefer base [2]", elem_id="label-base")
                b_tie = gr.Button("Tie [3]", elem_id="label-tie")
                b_skip = gr.Button("Skip [4]", elem_id="label-skip")
                b_undo = gr.Button("Undo [z]", elem_id="label-undo")
            status = gr.Markdown(elem_id="status")

        with gr.Tab("Dataset"):
            with gr.Row():
                filt = gr.Textbox(label="Prompt contains", scale=3)
                label_filt = gr.Dropdown(["any", "target", "base", "tie"], value="any", label="Label", scale=1)
                refresh = gr.Button("Refresh", scale=1, elem_id="refresh")
            table = gr.Dataframe(headers=["pair_id", "prompt", "label", "base_seed", "ref_seed", "score_base",
                                          "score_target"], interactive=False, elem_id="pairs-table")
            with gr.Row():
                pick_id = gr.Textbox(label="Pair id (click a row)", scale=3)
                new_label = gr.Dropdown(["target", "base", "tie"], value="target", label="New label", scale=1)
                relabel_btn = gr.Button("Relabel", scale=1)
                delete_btn = gr.Button("Delete", variant="stop", scale=1)
            with gr.Row():
                ds_base = gr.Image(label="Base", **PIXELS, interactive=False)
                ds_target = gr.Image(label="Target", **PIXELS, interactive=False)
            with gr.Row():
                export_dir = gr.Textbox(label="Export to folder (Parquet with caption/jpg_0/jpg_1/label_0 + trajectories)",
                                        value="dfusion_data/export", scale=3)
                export_btn = gr.Button("Export", scale=1)
                import_dir = gr.Textbox(label="Import a pair folder (an export or build-pairs output)", scale=3)
                import_btn = gr.Button("Import", scale=1)
            ds_status = gr.Markdown()

        with gr.Tab("Train"):
            gr.Markdown("Fine-tune a LoRA on the labelled pairs in a background process; the plot follows its log.")
            with gr.Row():
                algo = gr.Dropdown(["dpo", "traj-dpo", "ddpo", "dpok"], value="dpo", label="Algorithm")
                rank = gr.Number(value=4, precision=0, label="LoRA rank")
                lr = gr.Number(value=1e-4, label="Learning rate")
                beta = gr.Number(value=5000, label="beta (dpo: 5000, beta/2 convention; traj-dpo: 0.1)")
                tsteps = gr.Number(value=100, precision=0, label="Steps")
            with gr.Row():
                train_btn = gr.Button("Start", variant="primary", elem_id="train-start")
                cancel_btn = gr.Button("Cancel", variant="stop")
                resume_btn = gr.Button("Resume")
                load_btn = gr.Button("Load into the Fuse view")
                unload_btn = gr.Button("Back to the base weights")
                compare_btn = gr.Button("Before / after on held-out prompts")
            train_progress = gr.Slider(0, 1, value=0, label="Progress", interactive=False)
            train_status = gr.Markdown(elem_id="train-status")
            train_plot = gr.Plot(label="loss · implicit accuracy · reward margin")
            before_after = gr.Gallery(label="Before / after (fixed seeds)", columns=8, **PIXELS)
            timer = gr.Timer(2.0)

        with gr.Tab("Ablations"):
            gr.Markdown("For the current pair: early / late / all fusion steps, with and without the mask, and "
                        "three relative thresholds - from the reference cache.")
            abl_btn = gr.Button("Run the ablation grid", variant="primary", elem_id="ablate")
            abl_gallery = gr.Gallery(label="Targets", columns=9, **PIXELS, height=260)
            abl_plot = gr.Plot(label="Change against the base, inside vs outside the mask")

        # ---- handlers ----------------------------------------------------------------------------
        def words_update(p):
            try:
                choices, kws = svc.words(p)
            except UserError:
                return gr.update(choices=[], value=None), gr.update(choices=[], value=[])
            return (gr.update(choices=choices, value=kws[0] if kws else None),
                    gr.update(choices=choices, value=kws))

        @guarded
        def on_prompt(p):
            return words_update(p)

        @guarded
        def on_example(ex):
            if not ex:
                return gr.update(), gr.update(), gr.update()
            return (ex, *words_update(ex))

        @guarded
        def on_steps(n):
            n = int(n)
            return (gr.update(maximum=n, value=min(3, n)), gr.update(maximum=n, value=n),
                    gr.update(maximum=n, value=n))

        @guarded
        def on_sample(sess, p, st, g, e, n, s0_):
            sampling = svc.sampling(st, g, e)
            sess = svc.sample_candidates(sess, p, n, s0_, sampling)
            cands = list(sess.candidates.values())
            items = [(enlarge(c.image, 128), candidate_caption(c)) for c in cands]
            if all(c.score is not None for c in cands):
                best = max(cands, key=lambda c: c.score).seed
                worst = min(cands, key=lambda c: c.score).seed
            else:
                best, worst = cands[-1].seed, cands[0].seed
            if best == worst:
                best = cands[-1].seed
            return (sess, items, str(worst), str(best), *words_update(p))

        @guarded
        def on_pick(sess, which, evt: gr.SelectData):
            seeds = list(sess.candidates)
            if evt.index is None or evt.index >= len(seeds):
                return gr.update(), gr.update()
            s = str(seeds[evt.index])
            return (gr.update(), s) if which == "reference" else (s, gr.update())

        def _render(sess, word):
            r = sess.result
            ref = r.reference_image
            heat_im = None
            if word:
                groups = dict(zip(r.keywords, r.token_groups))
                idx = groups.get(word)
                if idx is None:
                    from dfusion_core.tokens import keyword_token_indices
                    try:  # e.g. a word past the 77-token limit: said as such, not as an internal error
                        idx = keyword_token_indices(svc.model.tokenizer, r.prompt, [word])[0]
                    except ValueError as e:
                        raise UserError(str(e)) from None
                heat_im = enlarge(heat_overlay(ref, r.token_maps[list(idx)].mean(0).numpy()))
            first, last = r.fusion.step_range(r.sampling.num_steps)
            m = r.masks[first - 1:last].mean(0).numpy()
            return heat_im, enlarge(mask_overlay(ref, m))

        @guarded
        def on_fuse(sess, p, st, g, e, b, rs, kws, mode, thr, start, end, lay, rsz, um, word, comb=None):
            sampling = svc.sampling(st, g, e)
            fusion = svc.fusion(sampling.num_steps, kws, mode, thr, start, end, lay, rsz, um, combine=comb)
            t0 = time.perf_counter()
            sess = svc.fuse(sess, p, b, rs, sampling, fusion)
            took = time.perf_counter() - t0
            r = sess.result
            heat_im, mask_im = _render(sess, word)
            cov = float(r.masks[start - 1:end].mean())
            how = "one batched run"
            if r.from_cache:
                how = "cache (target branch only" + (f", {r.steps_reused} of {r.sampling.num_steps} steps reused)"
                                                     if r.steps_reused else ")")
            msg = (f"fused in {how} · "
                   f"keywords {', '.join(r.keywords)} · mask covers {cov:.0%} · layers {lay} · steps {start}-{end} · "
                   f"{took:.2f} s")
            return (sess, enlarge(r.base_image), enlarge(r.reference_image), enlarge(r.target_image),
                    (enlarge(r.base_image), enlarge(r.target_image)), heat_im, mask_im, score_text(sess.scores), msg)

        @guarded
        def on_live(sess, *args):
            if sess.result is None:  # nothing fused yet: a control moved before the first fusion
                return (sess, *[gr.update()] * 7, "move a control after the first fusion to see it live")
            out = on_fuse(sess, *args)
            if out[0].same_pair:  # base, reference and their attention are unchanged: three fewer images to send
                out = (out[0], gr.skip(), gr.skip(), *out[3:5], gr.skip(), *out[6:])
            return out

        @guarded
        def on_word(sess, word):
            if sess.result is None or not word:
                return gr.update()
            return _render(sess, word)[0]

        @guarded
        def on_traj(sess, k):
            ims = svc.x0_images(sess)
            k = int(np.clip(int(k), 1, len(ims)))
            return enlarge(ims[k - 1])

        def labeller(lab):
            @guarded
            def on_label(sess):
                return svc.label(sess, lab)
            on_label.__name__ = f"label_{lab}"
            return on_label

        @guarded
        def on_undo(sess):
            return svc.undo(sess)

        @guarded
        def on_table(text, lab):
            rows = svc.store.summaries(text or None, None if lab == "any" else lab, limit=500)
            return [[r.pair_id, r.prompt, r.label, r.base_seed, r.ref_seed, r.scores.get("base"), r.scores.get("target")]
                    for r in rows]

        @guarded
        def on_row(evt: gr.SelectData, df):
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            pid = df.iloc[row, 0] if hasattr(df, "iloc") else df[row][0]
            rec = svc.store.get(pid)
            return pid, enlarge(rec.images.get("base")), enlarge(rec.images.get("target"))

        @guarded
        def on_relabel(pid, lab, text, lf):
            if not pid:
                raise UserError("click a row first")
            try:
                svc.store.relabel(pid, lab)
            except KeyError as e:
                raise UserError(str(e)) from None
            return f"pair {pid} relabelled '{lab}'", on_table(text, lf)

        @guarded
        def on_delete(pid, text, lf):
            if not pid:
                raise UserError("click a row first")
            try:
                svc.store.delete(pid)
            except KeyError as e:
                raise UserError(str(e)) from None
            return f"pair {pid} deleted", on_table(text, lf), None, None

        @guarded
        def on_export(folder):
            try:
                info = svc.store.export(folder)
            except OSError as e:
                raise UserError(f"cannot write {folder}: {e}") from None
            return f"exported {info['pairs']} pairs to {info['out']}"

        @guarded
        def on_import(folder, text, lf):
            if not folder or not folder.strip():
                raise UserError("type the folder to import")
            n = svc.store.import_pairs(folder.strip())
            return f"imported {n} pairs", on_table(text, lf)

        @guarded
        def on_train(a_, r_, lr_, b_, st_):
            return svc.train_start(a_, r_, lr_, b_, st_)

        def on_tick():
            msg, rows, frac = svc.train_status()
            return msg, frac, (training_plot(rows) if rows else None)

        @guarded
        def on_compare():
            prompts = [p for p in example_prompts()[:3]]
            items = svc.before_after(prompts)
            return [(enlarge(im, 128), cap) for im, cap in items]

        @guarded
        def on_ablate(sess):
            cells = svc.ablation(sess)
            items = [(enlarge(c.image, 128), c.label + (f" · {c.score:.3f}" if c.score is not None else "")) for c in cells]
            return items, ablation_plot(cells)

        # ---- wiring ------------------------------------------------------------------------------
        prompt.submit(on_prompt, [prompt], [words, keywords], api_name="words")
        prompt.blur(on_prompt, [prompt], [words, keywords], api_name=False)
        example.change(on_example, [example], [prompt, words, keywords], api_name="example")
        steps.release(on_steps, [steps], [start_step, end_step, traj_step], api_name="steps")
        sample_btn.click(on_sample, [state, prompt, steps, guidance, eta, n_cand, first_seed],
                         [state, gallery, base_seed, ref_seed, words, keywords], api_name="sample")
        gallery.select(on_pick, [state, click_sets], [base_seed, ref_seed], api_name=False)
        fuse_inputs = [state, prompt, steps, guidance, eta, base_seed, ref_seed, keywords, threshold_mode, threshold,
                       start_step, end_step, layers, resize, use_mask, words, combine]
        fuse_outputs = [state, base_img, ref_img, tgt_img, compare, heat, mask_img, scores_md, status]
        fuse_btn.click(on_fuse, fuse_inputs, fuse_outputs, api_name="fuse")
        for comp, ev, name in [(threshold, "release", "threshold"), (start_step, "release", "start_step"),
                               (end_step, "release", "end_step"), (threshold_mode, "input", "threshold_mode"),
                               (layers, "input", "layers"), (resize, "input", "resize"),
                               (use_mask, "input", "use_mask"), (keywords, "input", "keywords"),
                               (combine, "input", "combine")]:
            getattr(comp, ev)(on_live, fuse_inputs, fuse_outputs, api_name=f"refuse_{name}", trigger_mode="always_last")
        words.change(on_word, [state, words], [heat], api_name="word_heatmap")
        traj_step.release(on_traj, [state, traj_step], [x0_img], api_name="trajectory")
        for btn, lab in [(b_target, "target"), (b_base, "base"), (b_tie, "tie"), (b_skip, "skip")]:
            btn.click(labeller(lab), [state], [status], api_name=f"label_{lab}")
        b_undo.click(on_undo, [state], [status], api_name="undo")
        refresh.click(on_table, [filt, label_filt], [table], api_name="list_pairs")
        filt.submit(on_table, [filt, label_filt], [table], api_name=False)
        label_filt.change(on_table, [filt, label_filt], [table], api_name=False)
        table.select(on_row, [table], [pick_id, ds_base, ds_target], api_name=False)
        relabel_btn.click(on_relabel, [pick_id, new_label, filt, label_filt], [ds_status, table], api_name="relabel")
        delete_btn.click(on_delete, [pick_id, filt, label_filt], [ds_status, table, ds_base, ds_target],
                         api_name="delete_pair")
        export_btn.click(on_export, [export_dir], [ds_status], api_name="export")
        import_btn.click(on_import, [import_dir, filt, label_filt], [ds_status, table], api_name="import")
        train_btn.click(on_train, [algo, rank, lr, beta, tsteps], [train_status], api_name="train")
        for btn, action, name in [(cancel_btn, svc.train_cancel, "train_cancel"),
                                  (resume_btn, svc.train_resume, "train_resume"),
                                  (load_btn, svc.load_trained, "load_trained"),
                                  (unload_btn, svc.unload_trained, "unload_trained")]:
            btn.click(guarded(action), None, [train_status], api_name=name)
        compare_btn.click(on_compare, None, [before_after], api_name="before_after")
        timer.tick(on_tick, None, [train_status, train_progress, train_plot], api_name="train_status")
        abl_btn.click(on_ablate, [state], [abl_gallery, abl_plot], api_name="ablation")
        demo.load(on_prompt, [prompt], [words, keywords], api_name=False)
        demo.load(on_table, [filt, label_filt], [table], api_name=False)
    return demo
