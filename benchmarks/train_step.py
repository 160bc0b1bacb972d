"""Same as ``densemtl bench``: time training steps and inference (prints a table and JSON).

    python benchmarks/train_step.py --tasks semseg,depth,normals --backbone resnet18 \\
        --height 128 --width 256 --batch 2 --device cpu --json
"""

import sys

from densemtl.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
