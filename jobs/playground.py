"""`ziya-batch playground`: the seed's web demo (Chat) and a job's prompt tried on sample rows (Job).

    pip install 'ziya-batch[playground]'
    ziya-batch playground                          # the tiny oracle, on http://127.0.0.1:7860
    ziya-batch playground --visual /models/ziya-visual --llm /models/ziya-llama-13b --dtype bf16
    ziya-batch playground --job jobs/caption_dataset.yaml --host 0.0.0.0 --auth-file users.txt
    ziya-batch playground ... --engine vllm        # both tabs on ZiyaVLLMEngine (needs vLLM)

Chat: upload or pick a photograph and ask about it, turn after turn; the history is cleared when
the image changes. Answers come from `ZiyaBlip2ForCausalLM.chat()` (or, with `--engine vllm`,
from `ZiyaVLLMEngine`, as `ziya-chat --engine vllm`) with the generation settings of
`GenerationSettings`; the image goes through `decode_image` (the pipeline's pixel limit), so a
decompression bomb or a broken file is refused with a message. Job: open a job file, sample rows
of its manifest, run its task through the pipeline's own stages (`jobs/trial.py`), edit the
prompt and settings, rerun beside the previous answers, then save the edited job file or copy
the `--set` overrides.

Safe by default: binds 127.0.0.1; `--auth-file` (lines `user:password`) adds a login for a
shared host; one model per process, every model call queued one at a time; no file is served
but what the app shows (no `allowed_paths`; job files come by upload or from the `--job` list).
A job file is trusted like code (README, Security): whoever may use the Job tab may make this
process read what a job file can name (manifests, images under its allowed locations), so give
a shared playground's login only to people who may submit jobs.
"""

from __future__ import annotations

import functools
import html
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.trial import MAX_SAMPLE, Edits, JobTrial, LoadedModel, Sample
from pipeline.config import JobConfigError
from pipeline.guards.redact import redact
from pipeline.guards.text import clean_text
from ziya_model.generation import GenerationSettings
from ziya_model.processing import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLarge, decode_image

MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # the pipeline's default limits.max_image_bytes
MAX_QUESTION_CHARS = 2000  # the pipeline's default task.max_question_chars
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field")
# Sliders for GenerationSettings fields: (min, max, step) in the UI; the field's own bounds and
# description (shown under the slider) come from GenerationSettings.
SLIDERS = {
    "max_new_tokens": (1, 512, 1),
    "temperature": (0.05, 2.0, 0.05),
    "top_p": (0.05, 1.0, 0.05),
    "top_k": (0, 200, 1),
    "num_beams": (1, 8, 1),
    "repetition_penalty": (1.0, 2.0, 0.01),
    "no_repeat_ngram_size": (0, 6, 1),
}
GENERATION_FIELDS = ("do_sample", *SLIDERS)
NO_BEAMS = "the vLLM engine has no beam search: set num_beams to 1 (or use --engine transformers)"
CSS = """
#job-results table { border-collapse: collapse; width: 100%; font-size: 14px; }
#job-results td, #job-results th { border-bottom: 1px solid #ddd; padding: 6px; vertical-align: top; text-align: left; }
#job-results .previous { color: #666; }
#job-results .status-bad { color: #b00020; font-weight: 600; }
.note-error { color: #b00020; font-weight: 600; white-space: pre-wrap; }
.note-ok { color: #1b5e20; white-space: pre-wrap; }
"""


# -- model and inputs ----------------------------------------------------------------------------


def load_model(args) -> tuple[LoadedModel, str, list[str]]:
    """The process's one model, a line saying what it is, and questions it knows (oracle)."""
    questions: list[str] = []
    if args.visual is not None:
        visual, llm, dtype, device, note = args.visual, args.llm, args.dtype, args.device, ""
    else:
        (visual, llm), note, questions = _tiny_checkpoint(random_weights=args.tiny)
        dtype, device = "fp32", "cpu"
    loaded = open_model(visual, llm, dtype, device, args.engine)
    line = f"{loaded.name} ({note})" if note else loaded.name
    if loaded.engine != "transformers":
        line += f" on the {loaded.engine} engine"
    return loaded, line, questions


def open_model(visual, llm, dtype="auto", device="auto", engine="transformers") -> LoadedModel:
    """The model on `engine`: transformers (`load_ziya`) or vLLM (as `ziya-chat --engine vllm`,
    which picks its device itself)."""
    from ziya_model.loading import model_identity

    if engine == "vllm":
        from pipeline.stages.infer_vllm import _EngineModel
        from ziya_model.chat_cli import load_vllm

        vllm_engine, tokenizer, processor = load_vllm(Path(visual), Path(llm), dtype)
        model = _EngineModel(vllm_engine)  # the stand-in VLLMInferStage expects
    else:
        from ziya_model import load_ziya

        model, tokenizer, processor = load_ziya(visual, llm, dtype=dtype, device=device)
    name = model_identity(visual, llm)
    return LoadedModel(model, tokenizer, processor, name, str(visual), str(llm), engine)


def _tiny_checkpoint(random_weights: bool) -> tuple[tuple[Path, Path], str, list[str]]:
    """The oracle (a tiny model trained on the photographs) where it exists, else random weights."""
    try:
        from ziya_model import oracle
    except ImportError:
        random_weights = True
    if not random_weights:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        print("the oracle checkpoint (trained once, about a minute, then cached)", flush=True)
        tiny = oracle.cached_oracle_checkpoint(cache / "ziya-batch" / "oracle")
        note = "tiny oracle: knows a few questions about the scikit-image photographs, no more"
        questions = [*oracle.QUESTIONS, oracle.RECALL_QUESTION]
    else:
        from ziya_model import write_tiny_checkpoint

        tiny = write_tiny_checkpoint(tempfile.mkdtemp(prefix="ziya-playground-tiny-"))
        note = "tiny random-weight model: the answers are meaningless text"
        questions = []
    return (tiny.visual_dir, tiny.llm_dir), note, questions


@functools.cache
def photo_jpeg(name: str) -> bytes:
    """A photograph scikit-image ships, as the JPEG `ziya-batch demo` writes (quality 90)."""
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def photo_choices() -> list[str]:
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return []
    return list(PHOTOS)


def read_upload(path: str | None, limit: int = MAX_UPLOAD_BYTES) -> bytes:
    """Bytes of a file gradio received (its own cache path), at most `limit`."""
    with open(path, "rb") as f:  # a path in gradio's upload cache
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ImageTooLarge(f"file is larger than {limit} bytes")
    return data


def settings_from(values: list[Any]) -> GenerationSettings:
    """GenerationSettings from the controls' values (in GENERATION_FIELDS order); ValueError."""
    raw = dict(zip(GENERATION_FIELDS, values, strict=True))
    typed = {
        k: int(v) if GenerationSettings.model_fields[k].annotation is int else v
        for k, v in raw.items()
    }
    return GenerationSettings.split(typed)[0]


def _note(text: str, ok: bool = False) -> str:
    return f'<div class="{"note-ok" if ok else "note-error"}">{html.escape(text)}</div>'


# -- Chat tab ------------------------------------------------------------------------------------


class Chat:
    """The Chat tab's handlers; per-browser state is {"pixels", "queries", "answers"}."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded

    def set_image(self, data: bytes | None, label: str):
        """(preview, note, history, state): a new image clears the conversation."""
        empty: dict[str, Any] = {"pixels": None, "queries": [], "answers": []}
        if data is None:
            return None, "", [], empty
        try:
            image = decode_image(data, DEFAULT_MAX_PIXELS)
        except (ImageTooLarge, ImageDecodeError) as err:
            return None, _note(f"cannot use {label}: {err}"), [], empty
        state = {"pixels": self.loaded.processor([image]), "queries": [], "answers": []}
        note = _note(f"{label}: {image.width}x{image.height}; ask away", ok=True)
        preview = image.copy()
        preview.thumbnail((512, 512))
        return preview, note, [], state

    def from_upload(self, path: str | None):
        """set_image's outputs, and None for the photograph picker."""
        if path is None:
            return *self.set_image(None, ""), None
        try:
            data = read_upload(path)
        except (OSError, ImageTooLarge) as err:
            empty = self.set_image(None, "")
            return None, _note(f"cannot use the upload: {err}"), [], empty[3], None
        return *self.set_image(data, Path(path).name), None

    def from_photo(self, name: str | None):
        """set_image's outputs, and None for the upload."""
        if name not in PHOTOS:
            return *self.set_image(None, ""), None
        return *self.set_image(photo_jpeg(name), name), None

    def ask(self, question: str, state: dict, history: list, *controls):
        """(question box, history, state, stats): one answer from chat()."""
        if state is None or state.get("pixels") is None:
            return question, history, state, _note("upload or pick an image first")
        text, problem = clean_text(question, MAX_QUESTION_CHARS)
        if problem:
            return question, history, state, _note(f"question not asked: {problem}")
        try:
            settings = settings_from(list(controls))
        except ValueError as err:
            return question, history, state, _note(str(err))
        if self.loaded.engine == "vllm" and settings.num_beams > 1:
            return question, history, state, _note(NO_BEAMS)
        t0 = time.perf_counter()
        got = self._answer(text, state, settings)
        seconds = time.perf_counter() - t0
        answer = got.text
        state = {
            **state,
            "queries": [*state["queries"], text],
            "answers": [*state["answers"], answer],
        }
        history = [
            *history,
            {"role": "user", "content": text},
            {"role": "assistant", "content": answer},
        ]
        stats = _note(
            f"{got.num_tokens} tokens in {seconds:.2f} s, mean log-prob {got.mean_logprob:.3f} "
            f"(turn {len(state['queries'])})",
            ok=True,
        )
        return "", history, state, stats

    def _answer(self, text: str, state: dict, settings: GenerationSettings):
        """The `Answer` (text, tokens, mean log-prob) to `text` after the state's turns."""
        loaded = self.loaded
        with loaded.lock:
            if loaded.engine == "vllm":
                from ziya_model.vllm.engine import Request

                # Exact mode, as ziya-chat: the processor's normalized float32 [3, S, S].
                image = state["pixels"][0].numpy()
                request = Request(image, text, state["queries"], state["answers"])
                got = loaded.model.engine.answer([request], settings)[0]
                if isinstance(got, Exception):
                    raise got
                return got
            # chat() itself returns only the text; chat_answer is chat() with the token count.
            return loaded.model.chat_answer(
                tokenizer=loaded.tokenizer,
                pixel_values=state["pixels"],  # moved to the model's device by chat()
                query=text,
                previous_querys=state["queries"],
                previous_outputs=state["answers"],
                **settings.model_dump(),
            )

    @staticmethod
    def clear(state: dict):
        return (
            [],
            {**(state or {}), "queries": [], "answers": []},
            _note("history cleared", ok=True),
        )


# -- Job tab -------------------------------------------------------------------------------------


class JobTab:
    """The Job tab's handlers; per-browser state is {"trial", "previous"}."""

    def __init__(self, loaded: LoadedModel, job_files: dict[str, Path]):
        self.loaded = loaded
        self.job_files = job_files  # the only paths the app reads a job file from

    def _loaded(self, trial: JobTrial):
        job = trial.job
        caption = job.task.kind == "caption"
        prompt = job.task.caption_prompt if caption else "\n".join(job.task.questions)
        label = "Caption prompt" if caption else "task.questions (one per line)"
        same = {trial.job.model.visual, trial.job.model.llm} <= {
            self.loaded.visual_dir,
            self.loaded.llm_dir,
        }
        model = (
            "the job's model"
            if same
            else f"the playground's model; the job names {job.model.visual} + {job.model.llm}"
        )
        summary = (
            f"{trial.source}: {job.task.kind} job, manifest {job.input.uri}. "
            f"Answers come from {model}."
        )
        if job.model.engine != self.loaded.engine:
            summary += (
                f" The job runs on {job.model.engine}; here the {self.loaded.engine} engine "
                "answers (ziya-batch playground --engine)."
            )
        gen = job.generation.model_dump()
        return (
            {"trial": trial, "previous": None},
            _note(summary, ok=True),
            yaml_of(trial),
            _textbox(value=prompt, label=label),
            "",
            *[gen[k] for k in GENERATION_FIELDS],
        )

    def _failed(self, message: str):
        return ({"trial": None, "previous": None}, _note(redact(message)), "", _textbox(),
                "", *[_keep()] * len(GENERATION_FIELDS))  # fmt: skip

    def open_upload(self, path: str | None):
        if path is None:
            return self._failed("no job file")
        try:
            text = read_upload(path, 1 << 20).decode("utf-8")
            return self._loaded(JobTrial.from_text(text, Path(path).name))
        except (OSError, UnicodeDecodeError, ImageTooLarge, JobConfigError) as err:
            return self._failed(str(err))

    def open_named(self, name: str | None):
        path = self.job_files.get(name or "")
        if path is None:
            return self._failed("no job file")
        try:
            return self._loaded(JobTrial.from_text(path.read_text(encoding="utf-8"), str(path)))
        except (OSError, JobConfigError) as err:
            return self._failed(str(err))

    @staticmethod
    def _edits(trial: JobTrial, prompt: str, controls: list) -> Edits:
        generation = dict(zip(GENERATION_FIELDS, controls, strict=True))
        generation = settings_from(list(generation.values())).model_dump(include=set(generation))
        if trial.job.task.kind == "caption":
            return Edits(caption_prompt=prompt.strip(), generation=generation)
        questions = [q.strip() for q in prompt.splitlines() if q.strip()]
        return Edits(questions=questions, generation=generation)

    def run(self, state: dict, n: int, seed: int, prompt: str, *controls):
        """(results HTML, state): answers for the sample beside the previous run's."""
        trial = (state or {}).get("trial")
        if trial is None:
            return _note("open a job file first"), state
        try:
            edits = self._edits(trial, prompt, list(controls))
            sample = trial.sample(int(n), int(seed))
            t0 = time.perf_counter()
            rows = trial.run(sample, self.loaded, edits)
            seconds = time.perf_counter() - t0
        except Exception as err:  # a job the pipeline would refuse: say why, keep the app up
            return _note(redact(f"{type(err).__name__}: {err}")), state
        table = results_html(rows, state.get("previous"), sample, seconds, edits)
        return table, {**state, "previous": {"rows": rows, "edits": edits}}

    def save(self, state: dict, prompt: str, *controls):
        """(file to download, the saved YAML, --set lines, note)."""
        trial = (state or {}).get("trial")
        if trial is None:
            return None, "", "", _note("open a job file first")
        try:
            edits = self._edits(trial, prompt, list(controls))
            text = trial.saved_yaml(edits)
            overrides = trial.overrides(edits)
        except (ValueError, JobConfigError) as err:
            return None, "", "", _note(str(err))
        out = Path(tempfile.mkdtemp(prefix="ziya-playground-")) / _saved_name(trial.source)
        out.write_text(text, encoding="utf-8")
        lines = " \\\n    ".join(["ziya-batch run JOB.yaml", *overrides]) if overrides else ""
        note = f"validated; {len(overrides)} field(s) changed" if overrides else "no changes"
        return str(out), text, lines, _note(note, ok=True)


def _saved_name(source: str) -> str:
    stem = Path(source).stem or "job"
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:60]
    return f"{stem}-edited.yaml"


def yaml_of(trial: JobTrial) -> str:
    import yaml

    return yaml.safe_dump(trial.data, sort_keys=False, allow_unicode=True, width=100)


def _textbox(**kwargs):
    import gradio as gr

    return gr.update(**kwargs)


def _keep():
    import gradio as gr

    return gr.update()


def results_html(
    rows: list[dict], previous: dict | None, sample: Sample, seconds: float, edits: Edits
) -> str:
    """The gallery: thumbnail, id, question, answer (and the previous run's), status, confidence."""
    e = html.escape
    before = {(r["id"], r["question_index"]): r for r in (previous or {}).get("rows", [])}
    ok = sum(r["status"] == "ok" for r in rows)
    head = (
        f"<p>{len(rows)} answers for {len(sample.rows)} of {sample.total_rows} rows "
        f"({sample.files} manifest file(s)) in {seconds:.1f} s; {ok} ok.</p>"
    )
    cells = []
    for r in rows:
        thumb = f'<img src="{r["thumbnail"]}" alt="">' if r["thumbnail"] else ""
        old = before.get((r["id"], r["question_index"]))
        old_text = "" if old is None else old["answer"] or f"({old['status']})"
        status = e(r["status"]) + (f"<br>{e(r['error'] or '')}" if r["status"] != "ok" else "")
        conf = "" if r["mean_logprob"] is None else f"{r['mean_logprob']:.3f}"
        cells.append(
            "<tr class='result'>"
            f"<td>{thumb}</td><td class='id'>{e(r['id'])}<br><small>{e(r['image'] or '')}</small></td>"
            f"<td class='question'>{e(r['question'] or '')}</td>"
            f"<td class='answer'>{e(r['answer'] or '')}</td>"
            f"<td class='previous'>{e(old_text)}</td>"
            f"<td class='status{'' if r['status'] == 'ok' else ' status-bad'}'>{status}</td>"
            f"<td>{conf}</td><td>{r['num_tokens']}</td><td>{r['latency_s']:.2f}</td>"
            "</tr>"
        )
    return (
        head + "<table><thead><tr><th>image</th><th>id</th><th>question</th><th>answer</th>"
        "<th>previous answer</th><th>status</th><th>mean log-prob</th><th>tokens</th>"
        "<th>batch s</th></tr></thead><tbody>" + "".join(cells) + "</tbody></table>"
    )


# -- the app -------------------------------------------------------------------------------------


def _generation_controls(defaults: GenerationSettings, prefix: str) -> list:
    import gradio as gr

    fields = GenerationSettings.model_fields
    controls = [
        gr.Checkbox(
            value=defaults.do_sample,
            label="do_sample",
            info=fields["do_sample"].description,
            elem_id=f"{prefix}-do_sample",
        )
    ]
    for name, (lo, hi, step) in SLIDERS.items():
        value = getattr(defaults, name)
        controls.append(
            gr.Slider(
                minimum=lo,
                maximum=max(hi, value),
                step=step,
                value=value,
                label=name,
                info=fields[name].description,
                elem_id=f"{prefix}-{name}",
            )
        )
    return controls


def build_app(
    loaded: LoadedModel,
    model_line: str,
    job_files: dict[str, Path] | None = None,
    questions: list[str] | None = None,
):
    """The gradio Blocks of both tabs (not launched); `questions` are offered as examples."""
    import gradio as gr

    chat, jobs = Chat(loaded), JobTab(loaded, dict(job_files or {}))
    defaults = GenerationSettings()
    model_queue = {"concurrency_id": "model", "concurrency_limit": 1}
    with gr.Blocks(title="Ziya-Visual playground", analytics_enabled=False) as app:
        gr.Markdown(f"## Ziya-Visual playground\nModel: `{model_line}`")
        with gr.Tab("Chat", id="chat"):
            chat_state = gr.State({"pixels": None, "queries": [], "answers": []})
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(
                        label="Upload an image", file_types=["image"], elem_id="chat-upload"
                    )
                    photo = gr.Dropdown(
                        choices=photo_choices(),
                        value=None,
                        label="or pick a photograph",
                        elem_id="chat-photo",
                    )
                    preview = gr.Image(
                        label="Image", interactive=False, type="pil", elem_id="chat-image"
                    )
                    image_note = gr.HTML(elem_id="chat-image-note")
                with gr.Column(scale=2):
                    history = gr.Chatbot(
                        label="Conversation",
                        elem_id="chat-history",
                        render_markdown=False,
                        height=380,
                    )
                    question = gr.Textbox(label="Question", elem_id="chat-question", lines=1)
                    if questions:
                        gr.Examples([[q] for q in questions], question, label="Questions it knows")
                    with gr.Row():
                        ask = gr.Button("Ask", variant="primary", elem_id="chat-ask")
                        clear = gr.Button("Clear history", elem_id="chat-clear")
                    stats = gr.HTML(elem_id="chat-stats")
                    with gr.Accordion("Generation settings", open=False):
                        chat_controls = _generation_controls(defaults, "chat")
            image_outputs = [preview, image_note, history, chat_state]
            # One image source at a time: picking one empties the other. User events only
            # (upload, clear, input), so emptying a source does not fire it.
            upload.upload(chat.from_upload, upload, [*image_outputs, photo])
            upload.clear(chat.from_upload, upload, [*image_outputs, photo])
            photo.input(chat.from_photo, photo, [*image_outputs, upload])
            ask_args = (
                chat.ask,
                [question, chat_state, history, *chat_controls],
                [question, history, chat_state, stats],
            )
            ask.click(*ask_args, **model_queue)
            question.submit(*ask_args, **model_queue)
            clear.click(chat.clear, chat_state, [history, chat_state, stats])

        with gr.Tab("Job", id="job"):
            job_state = gr.State({"trial": None, "previous": None})
            with gr.Row():
                job_upload = gr.File(
                    label="Open a job file (YAML)",
                    file_types=[".yaml", ".yml"],
                    elem_id="job-upload",
                )
                job_named = gr.Dropdown(
                    choices=list(jobs.job_files),
                    value=None,
                    label="or one of these job files",
                    elem_id="job-named",
                )
            job_note = gr.HTML(elem_id="job-note")
            with gr.Accordion("Job file as written", open=False):
                job_yaml = gr.Code(language="yaml", interactive=False, elem_id="job-yaml")
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="Caption prompt", lines=2, elem_id="job-prompt")
                    with gr.Row():
                        n = gr.Slider(1, MAX_SAMPLE, value=8, step=1, label="Sample rows",
                                      elem_id="job-n")  # fmt: skip
                        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="job-seed")
                    with gr.Row():
                        run = gr.Button("Run sample", variant="primary", elem_id="job-run")
                        save = gr.Button("Save as job file", elem_id="job-save")
                with gr.Column(scale=1), gr.Accordion("Generation settings", open=False):
                    job_controls = _generation_controls(defaults, "job")
            results = gr.HTML(elem_id="job-results")
            with gr.Row():
                saved_file = gr.File(label="Edited job file", interactive=False,
                                     elem_id="job-saved-file")  # fmt: skip
                overrides = gr.Code(label="or run the original with", language="shell",
                                    interactive=False, elem_id="job-overrides")  # fmt: skip
            saved_note = gr.HTML(elem_id="job-saved-note")
            with gr.Accordion("Edited job file", open=False):
                saved_yaml = gr.Code(language="yaml", interactive=False, elem_id="job-saved-yaml")
            loaded_outputs = [job_state, job_note, job_yaml, prompt, results, *job_controls]
            job_upload.upload(jobs.open_upload, job_upload, loaded_outputs)
            job_named.change(jobs.open_named, job_named, loaded_outputs)
            run.click(
                jobs.run, [job_state, n, seed, prompt, *job_controls], [results, job_state],
                **model_queue,
            )  # fmt: skip
            save.click(
                jobs.save,
                [job_state, prompt, *job_controls],
                [saved_file, saved_yaml, overrides, saved_note],
            )
    return app


def read_auth_file(path: str) -> list[tuple[str, str]]:
    pairs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            user, sep, password = line.strip().partition(":")
            if not sep or not user or not password:
                raise SystemExit(f"{path}: each line must be user:password")
            pairs.append((user, password))
    if not pairs:
        raise SystemExit(f"{path}: no user:password line")
    return pairs


def packaged_job_files() -> dict[str, Path]:
    return {p.name: p for p in sorted(Path(__file__).parent.glob("*.yaml"))}


def serve(args) -> int:
    """`ziya-batch playground`: load the model, build the app, serve until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit(
            "the playground needs gradio: pip install 'ziya-batch[playground]'"
        ) from None
    auth = read_auth_file(args.auth_file) if args.auth_file else None
    job_files = {**packaged_job_files(), **{Path(p).name: Path(p) for p in args.job}}
    loaded, model_line, questions = load_model(args)
    app = build_app(loaded, model_line, job_files, questions)
    app.queue(default_concurrency_limit=1, max_size=64)
    print(f"playground on http://{args.host}:{args.port}  model: {model_line}", flush=True)
    try:
        app.launch(
            server_name=args.host,
            server_port=args.port,
            auth=auth,
            share=False,
            ssr_mode=False,
            show_error=False,
            max_file_size=MAX_UPLOAD_BYTES,
            quiet=True,
            footer_links=[],
            css=CSS,
        )
    finally:
        if loaded.engine == "vllm":
            loaded.model.engine.close()
    return 0
