"""Download a Llama checkpoint from the Hugging Face hub, for users who have one (never used by tests).

    python scripts/download.py meta-llama/Llama-3.2-1B-Instruct [--hf-token TOKEN]

Saves to checkpoints/<repo_id>/ (weights, config, tokenizer) and converts it to model.pth.
"""

import argparse
import sys
from pathlib import Path

from checkpoint import read_hf_folder, save_converted


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo_id")
    p.add_argument("--hf-token", default=None)
    p.add_argument("--out", type=Path, default=Path("checkpoints"))
    a = p.parse_args(argv)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        sys.exit("error: pip install huggingface_hub to download checkpoints")
    folder = a.out / a.repo_id
    snapshot_download(
        a.repo_id,
        local_dir=folder,
        token=a.hf_token,
        allow_patterns=["*.safetensors", "*.json", "tokenizer.model", "original/tokenizer.model"],
    )
    args, sd, _ = read_hf_folder(folder)
    save_converted(folder / "model.pth", args, sd)
    print(f"wrote {folder / 'model.pth'}")


if __name__ == "__main__":
    main()
