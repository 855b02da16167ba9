"""Speed on one device: ditopt eager and compiled, the unoptimised model, diffusers' hooks.

    python tools/bench_gpu.py --device cuda --shape wan-1.3b --json out.json
    python tools/bench_gpu.py --device cpu --shape tiny --steps 4 --repeats 1

See ditopt/bench/gpu.py for the variants and columns; ``ditopt bench --device cuda`` runs the same.
"""

from ditopt.bench.gpu import main

if __name__ == "__main__":
    main()
