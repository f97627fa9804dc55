"""Answer image (or video) questions from an export directory: `load(export_dir, backend).generate(images, prompts)`.

The runtime reads only the export directory: `manifest.json`, the processor files and the graph files of
one backend. It needs neither the recipe nor the original checkpoint, and no model code runs: the
"eager" backend executes the saved `torch.export` programs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokcompile.devices import kind, usable
from tokcompile.errors import RecipeError, TokcompileError
from tokcompile.export.base import runtime_device
from tokcompile.generation import GenerationConfig, continuation_logprobs, generate
from tokcompile.layout import GraphIO, GraphLayout
from tokcompile.manifest import FORMAT_VERSION, sha256

BACKENDS = {"onnxruntime": "onnx", "onnxruntime-int4": "onnx_int4", "aoti": "aoti", "eager": "eager",
            "torch_compile": "torch_compile", "tensorrt": "tensorrt"}

# Backends that run code from the export directory: opening an export with them is as safe as running a program
# its author gave you, so they need `trust_export=True` (`--trust-export`). onnxruntime reads only data.
TRUST_NEEDED = {
    "aoti": "loads a compiled shared library (native code) from the export directory",
    "eager": "loads pickled torch.export programs from the export directory",
    "torch_compile": "loads pickled torch.export programs from the export directory and compiles them",
    "tensorrt": "deserializes TensorRT engines from the export directory (an engine is not checked for safety)",
}


@dataclass
class Answer:
    texts: list[str]
    token_ids: list[list[int]]
    kept: dict[str, list[list[int]]]  # per reduction step (layout name: kept_j / assign_j), per sample
    first_logits: Any = None  # [N, V] float32 logits of the first answer token, with first_logits=True


@dataclass(frozen=True)
class Score:
    """A continuation scored after its prompt (`Generator.score`)."""

    logprob: float  # sum over its tokens of log p(token | prompt, tokens before it)
    tokens: int
    greedy: bool  # greedy decoding would write exactly these tokens


def _fail(key: str, msg: str) -> RecipeError:
    return RecipeError(key, msg)


def read_manifest(export_dir: Path) -> dict:
    path = export_dir / "manifest.json"
    if not path.is_file():
        raise _fail(str(export_dir), "is not an export directory (no manifest.json); run compile.py first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError) as e:
        raise _fail(str(path), f"is not valid JSON ({e}); recompile the export") from None
    if not isinstance(manifest, dict):
        raise _fail(str(path), f"holds a JSON {type(manifest).__name__}, not an object; recompile the export")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _fail(str(path), f"has format_version {version!r}, which is not an integer; the manifest is damaged, "
                               "recompile the export")
    if version < FORMAT_VERSION:
        raise _fail(
            str(path),
            f"was written in export format {version}, which this tokcompile no longer reads (format "
            f"{FORMAT_VERSION} has a separate vision graph); recompile the export",
        )
    if version > FORMAT_VERSION:
        raise _fail(
            str(path),
            f"was written in export format {version}, newer than this tokcompile reads ({FORMAT_VERSION}); "
            "upgrade tokcompile or recompile with this version",
        )
    check_manifest(manifest, path)
    return manifest


_REQUIRED: dict[str, type] = {"graphs": dict, "layout": dict, "plan": dict, "generation": dict}


def check_manifest(manifest: dict, path: Path) -> None:
    """The sections the runtime reads, with the right JSON types; one line naming what is missing."""
    for key, typ in _REQUIRED.items():
        if not isinstance(manifest.get(key), typ):
            got = "missing" if key not in manifest else f"a JSON {type(manifest[key]).__name__}"
            raise _fail(str(path), f"'{key}' is {got}, expected an object; the manifest is damaged, recompile the "
                                   "export")
    for key in ("geometry", "model_type"):
        if key not in manifest["plan"]:
            raise _fail(str(path), f"'plan.{key}' is missing; the manifest is damaged, recompile the export")


def inside(export_dir: Path, name: Any, what: str) -> Path:
    """`export_dir / name` for a file name the manifest gives, refused if it leaves the export directory (an
    absolute path, `..`, or a link pointing elsewhere): a manifest must not make the runtime open other files."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise _fail(str(export_dir / "manifest.json"), f"names {what} {name!r}, which is not a file name; recompile "
                                                       "the export")
    root = export_dir.resolve()
    path = (export_dir / name).resolve()
    if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_relative_to(root):
        raise _fail(str(export_dir / "manifest.json"), f"names {what} '{name}' outside the export directory; "
                                                       "refusing to open it, recompile the export")
    return export_dir / name


def layout_from_manifest(manifest: dict) -> GraphLayout:
    """The graphs' names as the compile recorded them."""
    lay = manifest["layout"]
    ios = [GraphIO(tuple(lay[g]["inputs"]), tuple(lay[g]["outputs"])) for g in ("vision", "prefill", "decode")]
    groups = tuple(tuple(g) for g in lay["cache_groups"])
    n_layers = manifest["plan"]["geometry"]["n_layers"]
    return GraphLayout(*ios, groups, tuple(lay["step_outputs"]), n_layers, tuple(lay.get("biased_groups", ())))


def _graph_runner(
    export_dir: Path, manifest: dict, graph: str, target: str, verify: bool = False, shared: dict | None = None
) -> Callable[[dict], tuple]:
    from tokcompile.export import aoti, eager, int4, onnx, tensorrt, torch_compile

    spec = manifest["graphs"].get(graph)
    if spec is None:
        raise _fail(str(export_dir), f"has no {graph} graph; recompile with this tokcompile version")
    art = spec["artifacts"].get(target)
    if art is None and target == "torch_compile":  # it runs the eager target's saved programs just as well
        art = spec["artifacts"].get("eager")
    if art is None:
        have = ", ".join(sorted(a["backend"] for a in spec["artifacts"].values()))
        fix = ("set export.weight_format: int4 (with onnx in export.targets)" if target == "onnx_int4"
               else f"add {target} to export.targets")
        raise _fail("--backend", f"this export has no {target} artifacts (it has: {have}); {fix} and recompile, "
                                 "or choose another backend")
    recorded = manifest.get("files", {})
    for f in art["files"]:
        path = inside(export_dir, f, f"the {graph} graph file")
        if not path.is_file():
            raise _fail(str(path), "is missing; the export is incomplete, recompile it")
        want = recorded.get(f, {})
        if "bytes" in want and path.stat().st_size != want["bytes"]:
            raise _fail(str(path), f"has {path.stat().st_size} bytes, the manifest says {want['bytes']}; "
                                   "the file is corrupt, recompile the export")
        checked = shared.setdefault("sha256_checked", set()) if shared is not None else set()  # files graphs share
        if verify and "sha256" in want and f not in checked:
            if sha256(path) != want["sha256"]:
                raise _fail(str(path), "does not match its sha256 in the manifest; the file is corrupt, recompile")
            checked.add(f)
    device = runtime_device(shared)
    built_for = art.get("device")  # artifacts compiled for one kind of device record it (AOTInductor, TensorRT)
    if built_for is not None and kind(built_for) != kind(device):
        fix = ("recompile the export with --device cuda (parity.device: cuda) on a CUDA machine"
               if kind(built_for) == "cpu" else "use --device cuda on a machine with a CUDA GPU")
        raise _fail("--device", f"this export's {target} artifacts are compiled for {built_for}, not {device}; "
                                f"{fix}, or choose another backend (onnxruntime and eager run on either)")
    names = [i["name"] for i in spec["inputs"]]
    loaders = {"onnx": onnx._load, "onnx_int4": int4._load, "tensorrt": tensorrt._load}
    by_graph = {"aoti": aoti._load, "eager": eager._load, "torch_compile": torch_compile._load}  # + the graph name
    first_file = str(export_dir / art["files"][0])
    try:
        if target in by_graph:
            run = by_graph[target](art["files"], names, graph)(export_dir, shared)
        else:
            run = loaders[target](art["files"], names)(export_dir, shared)
    except TokcompileError:
        raise
    except Exception as e:  # backends raise their own types for unreadable files
        raise _fail(first_file, f"could not be loaded ({_first_line(e)}); recompile the export") from None
    return _guarded(run, first_file, graph)


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _guarded(run: Callable[[dict], tuple], file: str, graph: str) -> Callable[[dict], tuple]:
    """A backend that fails while running a graph that loaded (for example weights corrupted at the same
    size, which only the sha256 check finds) is reported as one line naming the file."""
    def guarded(feed: dict) -> tuple:
        try:
            return run(feed)
        except Exception as e:
            raise _fail(file, f"the {graph} graph failed to run ({_first_line(e)}); the export may be corrupt: "
                              "check it with --verify (verify=True), or recompile it") from None
    return guarded


def open_image(im: Any) -> Any:
    """An RGB PIL image from a path or an image; a path that is not a readable image is one `--image` line."""
    from PIL import Image

    if isinstance(im, (str, Path)):
        p = Path(im)
        if p.is_dir():
            raise _fail("--image", f"{p} is a directory; give the path of an image file")
        if not p.is_file():
            raise _fail("--image", f"{p} does not exist; give the path of an image file")
        try:
            with Image.open(p) as opened:
                im = opened.convert("RGB")
        except Image.DecompressionBombError as e:
            raise _fail("--image", f"{p} is too large to decode safely ({e}); resize it first") from None
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
            raise _fail("--image", f"{p} is not a readable image ({_first_line(e)})") from None
    return im.convert("RGB")


class Generator:
    """A loaded export: prefill and decode graphs of one backend, plus the model's processor."""

    def __init__(self, export_dir: str | Path, backend: str = "onnxruntime", verify: bool = False,
                 trust_export: bool = False, prepack: bool = True, device: str = "cpu"):
        self.dir = Path(export_dir)
        self.device = usable("--device", device)
        if backend not in BACKENDS:
            raise _fail("--backend", f"unknown backend '{backend}'; use one of {', '.join(BACKENDS)}")
        if backend in TRUST_NEEDED and not trust_export:
            raise _fail("--backend", f"the {backend} backend {TRUST_NEEDED[backend]}, which can run arbitrary code; "
                                     "add --trust-export (trust_export=True) only for an export you built or trust, "
                                     "or use --backend onnxruntime, which is safe for any export")
        self.manifest = read_manifest(self.dir)
        self.backend = backend
        try:
            self._open(BACKENDS[backend], verify, prepack)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise _fail(str(self.dir / "manifest.json"), f"is damaged ({type(e).__name__}: {_first_line(e)}); "
                                                         "recompile the export") from None

    def _open(self, target: str, verify: bool, prepack: bool) -> None:
        """Graphs, processor and geometry as the manifest records them."""
        self.layout = layout_from_manifest(self.manifest)
        # what one backend shares between the graphs of this export (e.g. one copy of weights), and its options
        shared: dict = {"onnx_prepack": prepack, "device": self.device}
        self.graphs = [self.layout.graph(g).wrap(_graph_runner(self.dir, self.manifest, g, target, verify, shared))
                       for g in self.layout.graphs]
        self.batch_max = int(self.manifest["generation"]["batch_max"])
        self.image_size = tuple(self.manifest["plan"]["geometry"]["image_size"])
        proc_dir = inside(self.dir, self.manifest.get("processor", "processor"), "the processor directory")
        if not proc_dir.is_dir():
            raise _fail(str(proc_dir), "is missing; the export is incomplete, recompile it")
        from tokcompile.models import ADAPTERS, Geometry

        plan = self.manifest["plan"]
        if plan["model_type"] not in ADAPTERS:
            raise _fail(str(self.dir / "manifest.json"), f"needs model family '{plan['model_type']}', which this "
                                                         "tokcompile does not know; upgrade tokcompile")
        self.adapter = ADAPTERS.get(plan["model_type"])()
        try:
            self.processor = self.adapter.load_processor(str(proc_dir))
        except Exception as e:  # tokenizer and image-processor files fail in many ways
            raise _fail(str(proc_dir), f"could not be loaded ({_first_line(e)}); recompile the export") from None
        geom = dict(plan["geometry"])
        geom["image_size"], geom["layout"] = tuple(geom["image_size"]), tuple(geom.get("layout", ()))
        self.geometry = Geometry(**geom)
        self.fixed_inputs = self.manifest.get("media", {}).get("fixed_inputs", {})
        self.question = None  # where a vision-graph step reads the question: its tokenizer, saved in the export
        if plan.get("question"):
            from tokcompile.question import SAVED_DIR, QuestionSpec, QuestionTokenizer

            q_dir = inside(self.dir, SAVED_DIR, "the question tokenizer")
            if not q_dir.is_dir():
                raise _fail(str(q_dir), "is missing; the export is incomplete, recompile it")
            self.question = QuestionTokenizer.load(QuestionSpec(**plan["question"]), str(q_dir))

    def _image(self, im: Any) -> Any:
        return open_image(im)

    def _images(self, images: list[Any]) -> list[Any]:
        return [self._image(im) for im in images]

    def _videos(self, videos: list[Any]) -> list[list[Any]]:
        """Each video as a list of RGB PIL frames; a video is a sequence of frames (PIL images or paths) or a
        (F, H, W, 3) uint8 array."""
        import numpy as np
        from PIL import Image

        out = []
        for v in videos:
            if isinstance(v, np.ndarray):
                if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8:
                    raise _fail("videos", f"a video array must be (frames, height, width, 3) uint8, got {v.shape} "
                                          f"{v.dtype}")
                out.append([Image.fromarray(f) for f in v])
            elif isinstance(v, (list, tuple)):
                out.append([self._image(f) for f in v])
            else:
                raise _fail("videos", f"got a {type(v).__name__} where a video was expected; give a list of frames "
                                      "or a (frames, height, width, 3) uint8 array per prompt")
        return out

    def _batch(self, media: list[Any], prompts: list[str], prompt_format: str) -> dict[str, Any]:
        """The graphs' inputs for one chunk of (media, prompt) pairs, checked against what the export is compiled
        for (the fixed media inputs, the longest prompt)."""
        from tokcompile.parity import process

        try:
            batch = process(self.processor, self.adapter, self.geometry, media, prompts, prompt_format,
                            key="--prompt", question=self.question)
        except ValueError as e:  # media the compiled geometry cannot take (e.g. a video's frame count)
            raise _fail(f"--{self.geometry.media}", str(e)) from None
        for name, want in self.fixed_inputs.items():
            got = [row.tolist() for row in batch[name]]
            if any(row != want for row in got):
                raise _fail("--image", f"the processor produced {name} {got[0]}, but this export is compiled "
                                       f"for {want}; recompile with inputs.image_size for that resolution")
        limit = self.manifest["graphs"]["prefill"].get("prompt_len", {}).get("max")
        if limit is not None and batch["input_ids"].shape[1] > limit:
            raise _fail("prompts", f"a prompt needs {batch['input_ids'].shape[1]} tokens, more than the {limit} "
                                   "this export was compiled for; shorten it or raise inputs.max_prompt_len")
        return dict(batch)

    def generate(
        self,
        images: list[Any],
        prompts: list[str],
        *,
        max_new_tokens: int | None = None,
        stop_at_eos: bool = True,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        prompt_format: str = "auto",
        first_logits: bool = False,
    ) -> Answer:
        """Answer each (image, prompt) pair, or each (video, prompt) pair for an export compiled for video
        (`images` then holds one video per prompt: a list of frames or a (F, H, W, 3) uint8 array). Greedy by
        default; images are resized by the processor to the compiled resolution. Batches larger than the compiled
        maximum run in chunks. `max_new_tokens` defaults to the recipe's `inputs.max_new_tokens`.

        A prompt is a bare question, wrapped in the model's chat template, or a prompt formatted already that holds
        the model's placeholder once (LLaVA: "USER: <image>\\nWhat is shown? ASSISTANT:"), used as is.
        `prompt_format` "auto" tells them apart by the placeholder; "chat" or "raw" insists on one kind.
        `first_logits=True` also returns the logits the first answer token was chosen from (`Answer.first_logits`,
        [N, V]), which accuracy reports compare between models."""
        media = self.geometry.media
        if len(images) != len(prompts):
            raise _fail("prompts",
                        f"got {len(images)} {media}s and {len(prompts)} prompts; give one {media} per prompt")
        eos = self.manifest["generation"].get("eos_token_id") if stop_at_eos else None
        if max_new_tokens is None:
            max_new_tokens = int(self.manifest["generation"].get("max_new_tokens", 32))
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, temperature=temperature,
                               top_p=top_p, seed=seed)
        imgs = self._videos(images) if media == "video" else self._images(images)
        texts, ids, firsts = [], [], []
        kept: dict[str, list[list[int]]] = {n: [] for n in self.layout.step_outputs}
        for start in range(0, len(imgs), self.batch_max):
            chunk = slice(start, start + self.batch_max)
            batch = self._batch(imgs[chunk], list(prompts[chunk]), prompt_format)
            result = generate(*self.graphs, batch, layout=self.layout, cfg=cfg, keep_logits=first_logits)
            if first_logits:
                firsts.append(result.step_logits[0])
            for seq in result.sequences():
                if eos is not None and seq and seq[-1] == eos:
                    seq = seq[:-1]
                ids.append(seq)
                texts.append(self.processor.tokenizer.decode(seq, skip_special_tokens=True))
            for name, k in result.kept.items():
                kept[name].extend(k.tolist())
        return Answer(texts, ids, kept, torch.cat(firsts) if firsts else None)

    def score(self, images: list[Any], prompts: list[str], continuations: list[str] | list[list[int]], *,
              prompt_format: str = "auto") -> list[Score]:
        """For each (image, prompt, continuation): the log-probability the export gives the continuation as the
        answer's start, its token count, and whether greedy decoding would write exactly those tokens.

        The continuation's tokens are those the tokenizer gives the formatted prompt followed by the
        continuation, past the prompt's own tokens (so a leading space joins the word as it would in the
        answer); where the prompt's tokens change at the join, the continuation is tokenized alone."""
        from tokcompile.parity import format_prompt

        if not len(images) == len(prompts) == len(continuations):
            raise _fail("prompts", f"got {len(images)} {self.geometry.media}s, {len(prompts)} prompts and "
                                   f"{len(continuations)} continuations; give one of each per request")
        tok = self.processor.tokenizer
        imgs = self._videos(images) if self.geometry.media == "video" else self._images(images)
        scores: list[Score] = []
        for start in range(0, len(imgs), self.batch_max):
            chunk = slice(start, start + self.batch_max)
            batch = self._batch(imgs[chunk], list(prompts[chunk]), prompt_format)
            rows = []
            for prompt, cont in zip(prompts[chunk], continuations[chunk]):
                if isinstance(cont, str):
                    text = format_prompt(self.processor, self.adapter, prompt, self.geometry.media, prompt_format)
                    head = tok(text, add_special_tokens=False)["input_ids"]
                    whole = tok(text + cont, add_special_tokens=False)["input_ids"]
                    ids = whole[len(head):] if whole[:len(head)] == head else \
                        tok(cont, add_special_tokens=False)["input_ids"]
                else:
                    ids = [int(t) for t in cont]
                if not ids:
                    raise _fail("continuations", f"{cont!r} has no tokens; give a non-empty continuation")
                rows.append(ids)
            width = max(len(r) for r in rows)
            pad = tok.eos_token_id if tok.eos_token_id is not None else 0
            continuation = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (b, n)
            logprobs, greedy = continuation_logprobs(*self.graphs, batch, layout=self.layout,
                                                     continuation=continuation)
            for b, r in enumerate(rows):
                scores.append(Score(float(logprobs[b, :len(r)].sum()), len(r), bool(greedy[b, :len(r)].all())))
        return scores


def load(export_dir: str | Path, backend: str = "onnxruntime", verify: bool = False,
         trust_export: bool = False, prepack: bool = True, device: str = "cpu") -> Generator:
    """Open an export directory with one backend: "onnxruntime", "onnxruntime-int4" (the INT4-weight graphs of an
    export compiled with `export.weight_format: int4`), "aoti", "eager", "torch_compile" or "tensorrt".

    File sizes are always checked against the manifest; `verify=True` also checks every graph file's sha256.
    The onnxruntime backends only read data and are safe for an export from anywhere; the others run code
    stored in the export (a shared library, pickled programs, engines) and need `trust_export=True`.

    onnxruntime maps the export's one weight file in place, so all graphs share one copy in memory; `prepack=True`
    lets its CPU kernels also keep a pre-packed copy of each MatMul weight per graph (faster prefill, more memory).

    `device` ("cpu", "cuda", "cuda:N") is where the graphs run and their outputs stay between steps (the KV cache
    too): onnxruntime's CUDA provider (onnxruntime-gpu), the exported programs moved to the GPU, AOTInductor
    packages compiled for CUDA (`--device cuda` at compile time), TensorRT engines. Answers come back on the host.
    """
    return Generator(export_dir, backend, verify, trust_export, prepack, device)
