"""Peak resident memory of one call in a fresh process, for tests/test_memory.py.

``python tests/memory_child.py KIND CHECKPOINT HEIGHT WIDTH`` builds the chat inputs of one random
``HEIGHT x WIDTH`` photo with ov_jax's processor, runs KIND once and prints one JSON line:
``{"tokens": prompt length, "peak_bytes": VmHWM}``. KIND: ``ours`` (``LlavaOnevision(**inputs)``, float32),
``torch`` (transformers' float32 forward on the same inputs) or ``compare`` (``ov_jax.compare.compare``).
"""

import json
import sys


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def main(kind: str, checkpoint: str, height: int, width: int) -> None:
    import numpy as np
    from PIL import Image

    from ov_jax.processing.chat import single_turn
    from ov_jax.processing.processor import LlavaOnevisionProcessor

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    messages = single_turn("Describe this image.", [image])
    inputs = dict(LlavaOnevisionProcessor.from_pretrained(checkpoint).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True))
    if kind == "ours":
        from ov_jax.model import LlavaOnevision

        LlavaOnevision.from_pretrained(checkpoint)(**inputs).logits.block_until_ready()
    elif kind == "torch":
        import torch
        import transformers

        torch.set_num_threads(2)
        model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
        with torch.no_grad():
            model.eval()(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
    elif kind == "compare":
        from ov_jax.compare import compare

        result = compare(checkpoint, images=[image], max_new_tokens=0, progress=False)
        assert result.passed, result.table()
    else:
        raise ValueError(f"unknown kind {kind!r}")
    print(json.dumps({"tokens": int(np.asarray(inputs["input_ids"]).shape[1]), "peak_bytes": peak_bytes()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
