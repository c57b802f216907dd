# CPU image with every backend ([all]); the default command prints the CLI help.
#   docker build -t edgevit .
#   docker run --rm -v "$PWD/exports:/work/exports" edgevit edgevit export deit_tiny --target all
# torch==2.13.0 comes from the pinned constraints. Plain PyPI serves the CUDA build of torch (large,
# but it runs on CPU); to get the CPU-only wheel, pass an index or a folder of wheels that has it:
#   docker build --build-arg PIP_EXTRA_INDEX_URL=<index with CPU torch wheels> -t edgevit .
FROM python:3.11-slim

ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_FIND_LINKS=${PIP_FIND_LINKS}

WORKDIR /opt/edgevit
COPY pyproject.toml constraints.txt README.md ./
COPY edgevit ./edgevit
COPY export ./export
COPY devices ./devices
RUN pip install -c constraints.txt ".[all]" && edgevit --version

WORKDIR /work
CMD ["edgevit", "--help"]
