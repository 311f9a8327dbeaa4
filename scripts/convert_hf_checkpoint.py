"""Convert a Hugging Face Llama folder (config.json + safetensors) into one `model.pth` for fast loading.

    python scripts/convert_hf_checkpoint.py checkpoints/meta-llama/Llama-3.2-1B-Instruct

Writes model.pth ({"args": ModelArgs fields, "state_dict": tensors in model.py's names}) into the same
folder (or --out). generate.py reads the folder directly too; converting only saves start-up time.
"""

import argparse
import sys
from pathlib import Path

from checkpoint import CheckpointError, read_hf_folder, save_converted


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="Hugging Face model folder")
    p.add_argument("--out", type=Path, default=None, help="output file (default: FOLDER/model.pth)")
    a = p.parse_args(argv)
    if not a.folder.is_dir():
        sys.exit(f"error: {a.folder} is not a folder")
    try:
        args, sd, _ = read_hf_folder(a.folder)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    out = a.out or a.folder / "model.pth"
    save_converted(out, args, sd)
    print(f"wrote {out}: {sum(t.numel() for t in sd.values()) / 1e6:.1f}M parameters, {args}")
    return out


if __name__ == "__main__":
    main()
