# GPU deployment of the web app. Build: docker build -t lvlm-interpret .
# Run:   docker run --gpus all -p 7860:7860 lvlm-interpret [--model HUB_ID]
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip curl \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 app
WORKDIR /home/app/lvlm_interpret
COPY --chown=app:app requirements.txt .
# On a GPU host the CUDA build of the same pinned torch is wanted: take it from PyTorch's index.
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --extra-index-url https://download.pytorch.org/whl/cu128 \
    -r requirements.txt
COPY --chown=app:app . .
USER app
ENV PATH=/opt/venv/bin:$PATH
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD curl -fs http://127.0.0.1:7860/ || exit 1
ENTRYPOINT ["python3", "app.py", "--host", "0.0.0.0", "--port", "7860"]
