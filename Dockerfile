# The cxr-tune image: Ray's own GPU image at the Ray version this project pins, with the project
# and its locked dependencies (constraints.txt, JAX with CUDA included) installed. One image for
# every node (KubeRay head and workers: cluster/rayjob.yaml), so every node has the same versions.
#
#   docker build -t cxr-tune:0.1.0 .
#   docker run --rm cxr-tune:0.1.0 cxr --help
#   docker run --rm --gpus all cxr-tune:0.1.0 python -c "import jax; print(jax.devices())"
#
# Checked offline in tests/test_cluster_recipes.py (base image = the locked Ray, every COPY source
# exists, the copied files build the package); no Docker daemon was available to build it here.
FROM rayproject/ray:2.60.0-py311-gpu

# Keras on JAX (CUDA) in every process of every node: the driver imports Keras before trials start.
ENV KERAS_BACKEND=jax

WORKDIR /home/ray/cxr-tune
# The lock first: its layer (the big one, ~3 GB of wheels) is rebuilt only when the lock changes.
COPY --chown=ray:users constraints.txt ./
RUN pip install --no-cache-dir -r constraints.txt
COPY --chown=ray:users pyproject.toml README.md LICENSE ./
COPY --chown=ray:users datasets ./datasets
COPY --chown=ray:users cxr_model ./cxr_model
COPY --chown=ray:users search ./search
# Only the project itself is new here (its dependencies are the lock's, installed above); the
# import line fails the build where the image could not run a sweep.
RUN pip install --no-cache-dir -c constraints.txt '.[gpu]' \
    && cxr --help > /dev/null && python -c "import jax, keras, optuna, ray.tune, ray.dashboard"
