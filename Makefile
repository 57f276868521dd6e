# TorchServe handler and model-archive kit. `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# scripts/ by what each part is for: packaging (model folders, archives, exports), serve (servers, clients,
# demo, soak), bench (benchmarks, tuning, profiles), deploy (images, Kubernetes, KServe, Triton), eval (task
# metrics through a server, variants chosen by them)
SCRIPTS_PATH := scripts/packaging:scripts/serve:scripts/bench:scripts/deploy:scripts/eval
PY := PYTHONPATH=handlers:$(SCRIPTS_PATH) $(VENV)/bin/python
ARCHIVER := $(VENV)/bin/torch-model-archiver
DEMOS := digits resnet18 mobilenet_v3_small fasterrcnn shapes shapes_seg
HANDLER_SRC := $(wildcard handlers/*.py handlers/servekit/*.py)
GRPC_STUBS := scripts/serve/ts_grpc/inference_pb2_grpc.py
MODELS ?= models
STORE ?= model_store
ALL_MARS := $(patsubst $(MODELS)/%/model-config.yaml,$(STORE)/%.mar,$(wildcard $(MODELS)/*/model-config.yaml))

# $(call archive,<archive name>,<archive_args.py arguments>): torch-model-archiver stages in
# $TMPDIR/<model name> and deletes that directory before and after, so each archive gets its own
# private (0700) TMPDIR under build/: never a shared /tmp/<name> that another user could own or fill.
define archive
	@mkdir -p build/args $(STORE)
	$(PY) scripts/packaging/archive_args.py $(2) --export $(STORE) > build/args/$(1).args
	@rm -rf build/archiver-tmp/$(1) && mkdir -p build/archiver-tmp && mkdir -m 0700 build/archiver-tmp/$(1)
	TMPDIR=$(CURDIR)/build/archiver-tmp/$(1) $(ARCHIVER) $$(cat build/args/$(1).args)
	@rm -rf build/archiver-tmp/$(1)
endef
PYTEST_ARGS ?=

.PHONY: help
help: ## List the targets
	@if [ -t 1 ]; then on=$$'\033[36m'; off=$$'\033[0m'; else on=; off=; fi; \
	grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' -v on="$$on" -v off="$$off" '{printf "  %s%-14s%s %s\n", on, $$1, off, $$2}'

.PHONY: install
install: $(STAMP) $(GRPC_STUBS) ## Create .venv with the exact pins and check for Java >= 11

$(STAMP): requirements.txt requirements-executorch.txt scripts/packaging/check_java.sh
	@bash scripts/packaging/check_java.sh
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps -r requirements-executorch.txt
	touch $@

$(GRPC_STUBS): $(STAMP) scripts/packaging/gen_grpc.py
	$(PY) scripts/packaging/gen_grpc.py

.PHONY: grpc-stubs
grpc-stubs: $(GRPC_STUBS) ## Generate gRPC stubs from the protos inside TorchServe's frontend jar

# Zoo demos (seeded): a timm convnext_atto state_dict and a Hugging Face ViT save_pretrained folder.
ZOO_DEMOS := timm_convnext hf_vit
ZOO_WEIGHTS := models/timm_convnext/model.pt models/hf_vit/model.safetensors
# ... and every backend of theirs (ONNX Runtime, OpenVINO, int8, AOTInductor), for the tests and `make bench-zoo`
ZOO_VARIANTS := $(foreach m,$(ZOO_DEMOS),$(STORE)/$(m).mar $(STORE)/$(m)_onnx.mar $(STORE)/$(m)_openvino.mar $(STORE)/$(m)_int8.mar $(STORE)/$(m)_aoti.mar)

.PHONY: models
models: $(foreach m,$(DEMOS),models/$(m)/model.pt) $(ZOO_WEIGHTS) models/lraspp/model.pt models/hf_rtdetr/model.safetensors models/letters/model.pt ## Build the demo models (trained digits CNN, letters MobileNetV3, shapes detector and segmenter, seeded torchvision, timm and Hugging Face nets, a seeded RT-DETR)

.PHONY: sample-images
sample-images: | $(STAMP) ## Images to send the demo models: photos scikit-image ships, a held-out digit and shapes scene -> build/samples/
	$(PY) scripts/packaging/make_models.py --samples build/samples

.PHONY: docs
docs: | $(STAMP) ## The documentation site: the configuration page from the typed config, then mkdocs build --strict -> build/site/
	$(PY) scripts/packaging/docs_site.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

models/%/model.pt: | $(STAMP)
	$(PY) scripts/packaging/make_models.py $*

models/digits/model.pt: models/digits/model.py scripts/packaging/demo_models.py
models/hf_vit/model.safetensors models/hf_rtdetr/model.safetensors: | $(STAMP)
	$(PY) scripts/packaging/make_models.py $(notdir $(@D))
models/shapes/model.pt: models/shapes/model.py scripts/packaging/shapes.py
models/shapes_seg/model.pt: models/shapes_seg/model.py scripts/packaging/shapes.py scripts/packaging/shapes_seg.py
models/letters/model.pt: scripts/packaging/letters.py

# The weights `make models` generates. A rule that reads a model folder names them too (folder_files), so that
# `make -j` builds them first: a wildcard read before they exist would leave them out.
GENERATED := $(foreach m,$(DEMOS) timm_convnext lraspp letters,models/$(m)/model.pt) $(foreach m,hf_vit hf_rtdetr,models/$(m)/model.safetensors)
folder_files = $(filter-out %/__pycache__,$(sort $(wildcard $(1)/$(2)/*) $(filter $(1)/$(2)/%,$(GENERATED))))

.PHONY: archive
archive: $(if $(MODEL),$(STORE)/$(MODEL).mar,$(ALL_MARS)) ## Build .mar archives (all, or MODEL=<name>)

# Each demo archive also needs its generated weights.
$(foreach m,$(DEMOS),$(eval $(STORE)/$(m).mar: models/$(m)/model.pt))
$(STORE)/timm_convnext.mar: models/timm_convnext/model.pt
$(STORE)/lraspp.mar: models/lraspp/model.pt
$(STORE)/letters.mar: models/letters/model.pt
$(STORE)/hf_vit.mar: models/hf_vit/model.safetensors
$(STORE)/hf_rtdetr.mar: models/hf_rtdetr/model.safetensors

.SECONDEXPANSION:
# A folder's recorded choice (variant.yaml and variant/, from make variants) is archived as <name>.mar;
# VARIANT=<kind> overrides it (VARIANT=eager: the folder's own model) and rebuilds.
$(STORE)/%.mar: $(MODELS)/%/model-config.yaml $$(call folder_files,$(MODELS),$$*) $(HANDLER_SRC) scripts/packaging/archive_args.py scripts/packaging/variant_kinds.py $(if $(VARIANT),FORCE) | $(STAMP)
	$(call archive,$*,$* --models $(MODELS) $(if $(VARIANT),--kind $(VARIANT)) $(if $(VARIANTS_OUT),--built $(VARIANTS_OUT)))

.PHONY: FORCE
FORCE:

# ONNX exports, int8 quantization, and archives that serve them with ONNX Runtime.
ONNX_DIR := build/onnx
TRITON_STAMP := model_repository/.generated
CLASSIFIERS := digits resnet18 mobilenet_v3_small

.PHONY: onnx
onnx: $(foreach m,$(DEMOS),$(ONNX_DIR)/$(m)/model.onnx) ## Export every model to ONNX (named tensors, dynamic axes), checked against torch

.PHONY: int8
int8: $(foreach m,$(CLASSIFIERS),$(ONNX_DIR)/$(m)/model.int8.onnx) ## Static int8 quantization of the classifiers' ONNX graphs, with fidelity

$(ONNX_DIR)/%/model.onnx: $$(call folder_files,models,$$*) scripts/packaging/export_onnx.py handlers/servekit/onnx_backend.py | $(STAMP)
	$(PY) scripts/packaging/export_onnx.py $*

$(ONNX_DIR)/%/model.int8.onnx: $(ONNX_DIR)/%/model.onnx scripts/packaging/quantize_onnx.py scripts/bench/fidelity.py
	$(PY) scripts/packaging/quantize_onnx.py $*

$(STORE)/%_onnx.mar: $(ONNX_DIR)/%/model.onnx $(HANDLER_SRC) scripts/packaging/archive_args.py
	$(call archive,$*_onnx,$* --variant $<)

$(STORE)/%_int8.mar: $(ONNX_DIR)/%/model.int8.onnx $(HANDLER_SRC) scripts/packaging/archive_args.py
	$(call archive,$*_int8,$* --variant $<)

# OpenVINO on the CPU, from the same ONNX export (format openvino).
$(STORE)/%_openvino.mar: $(ONNX_DIR)/%/model.onnx $(HANDLER_SRC) scripts/packaging/archive_args.py
	$(call archive,$*_openvino,$* --variant $< --backend openvino)

# The side-by-side benchmark: stock-handler archives of the same weights, and every kit variant.
STOCK_STORE := build/stock_store
SEG_BENCH_INPUTS := model_store/lraspp.mar $(STOCK_STORE)/lraspp_stock.mar model_store/shapes_seg_onnx.mar $(TRITON_STAMP)
BENCH_INPUTS := $(foreach m,resnet18 mobilenet_v3_small fasterrcnn,model_store/$(m).mar model_store/$(m)_onnx.mar $(STOCK_STORE)/$(m)_stock.mar) \
	model_store/digits_onnx.mar model_store/shapes_onnx.mar model_store/shapes_openvino.mar model_store/resnet18_openvino.mar model_store/resnet18_int8.mar model_store/resnet18_aoti.mar model_store/resnet18_exported.mar \
	model_store/resnet18_compile.mar model_store/mobilenet_v3_small_int8.mar model_store/mobilenet_v3_small_openvino.mar $(ONNX_DIR)/digits/model.int8.onnx \
	$(TRITON_STAMP) $(ZOO_VARIANTS) $(SEG_BENCH_INPUTS) model_store/hf_rtdetr.mar

$(STOCK_STORE)/%_stock.mar: $$(call folder_files,models,$$*) scripts/packaging/stock_archives.py | $(STAMP)
	$(PY) scripts/packaging/stock_archives.py $* --export $(STOCK_STORE)

.PHONY: bench
bench: $(BENCH_INPUTS) ## Full benchmark (about 60 min): raw model, stock handlers, kit per backend, segmentation, DETR -> scripts/bench_results/
	$(PY) scripts/bench/bench.py --mode full --out scripts/bench_results
	$(MAKE) --no-print-directory bench-peers

.PHONY: bench-peers
bench-peers: $(STORE)/$(or $(MODEL),resnet18).mar $(STORE)/$(or $(MODEL),resnet18)_onnx.mar | $(STAMP) ## The kit against LitServe and Ray Serve (their own venv, build/peers/venv), same weights and client, process layouts, CPU per request: [MODEL=resnet18] [ROUNDS=2] [SECONDS=10] [NEIGHBOURS=1: a busy process beside] -> build/bench-peers/
	$(PY) scripts/bench/bench_peers.py --model $(or $(MODEL),resnet18) $(if $(ROUNDS),--rounds $(ROUNDS)) $(if $(SECONDS),--seconds $(SECONDS)) \
		$(if $(NEIGHBOURS),--neighbours $(NEIGHBOURS) --out build/bench-peers-neighbours)

.PHONY: bench-backends
bench-backends: $(BENCH_INPUTS) ## resnet18 on every backend (eager, ONNX, int8, exported, AOTInductor, compile), in process and served -> build/bench-backends/
	$(PY) scripts/bench/bench.py --mode backends --out build/bench-backends

.PHONY: tune
tune: $(if $(MODEL),$(STORE)/$(MODEL).mar) | $(STAMP) ## Sweep archive variants x batchSize x maxBatchDelay x workers x threads on a real TorchServe: MODEL=<name> [P99_MS=<bound>] -> build/tune/<name>/
	@test -n "$(MODEL)" || { echo "usage: make tune MODEL=<name> [P99_MS=<p99 bound in ms>]"; exit 2; }
	$(PY) scripts/bench/tune.py $(MODEL) --store $(STORE) $(if $(P99_MS),--p99-ms $(P99_MS))

.PHONY: keys-vs-stock
keys-vs-stock: $(if $(MODEL),$(STORE)/$(MODEL).mar $(STOCK_STORE)/$(MODEL)_stock.mar) | $(STAMP) ## The kit's archive against the stock handler's at four batchSize/maxBatchDelay settings, same keys: MODEL=<name> -> build/tune/<name>/against_stock.md
	@test -n "$(MODEL)" || { echo "usage: make keys-vs-stock MODEL=<resnet18|mobilenet_v3_small|fasterrcnn>"; exit 2; }
	$(PY) scripts/bench/tune.py $(MODEL) --store $(STORE) --against-stock $(STOCK_STORE) --seconds 10

.PHONY: decode-fidelity
decode-fidelity: models ## Reduced-scale JPEG decode vs full decode on 4K upscales of the digits and shapes held-out sets
	$(PY) scripts/bench/fidelity.py

.PHONY: bench-photos
bench-photos: model_store/resnet18.mar model_store/resnet18_int8.mar model_store/resnet18_openvino.mar model_store/mobilenet_v3_small.mar model_store/mobilenet_v3_small_int8.mar model_store/mobilenet_v3_small_openvino.mar $(STOCK_STORE)/resnet18_stock.mar $(STOCK_STORE)/mobilenet_v3_small_stock.mar ## Photos at the sizes users send (12 MP, 1080p, 640x480, PNG screenshot), stock vs kit, c=16, worker memory -> build/bench-photos/
	$(PY) scripts/bench/bench.py --mode photos --out build/bench-photos

.PHONY: bench-plain
bench-plain: model_store/resnet18.mar model_store/mobilenet_v3_small.mar model_store/fasterrcnn.mar $(foreach m,resnet18 mobilenet_v3_small fasterrcnn,$(STOCK_STORE)/$(m)_stock.mar) ## The archive make archive builds vs TorchServe's stock handler, every demo model with a stock handler, at each image size -> build/bench-plain/
	$(PY) scripts/bench/bench.py --mode plain --out build/bench-plain

.PHONY: profile-workers
profile-workers: model_store/$(or $(MODEL),resnet18).mar $(STOCK_STORE)/$(or $(MODEL),resnet18)_stock.mar ## py-spy samples of the kit's and the stock handler's workers under the same load: [MODEL=resnet18|mobilenet_v3_small|fasterrcnn] (needs py-spy) -> build/profile/
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) scripts/bench/profile_workers.py --model $(or $(MODEL),resnet18) --out build/profile/$(or $(MODEL),resnet18)

.PHONY: bench-explain
bench-explain: | $(STAMP) ## What an explanation costs next to a prediction, and its answer size against TorchServe's stock Integrated Gradients -> build/bench-explain/
	$(PY) scripts/bench/bench_explain.py --out build/bench-explain

.PHONY: bench-zoo
bench-zoo: model_store/resnet18.mar model_store/resnet18_onnx.mar model_store/resnet18_openvino.mar $(ZOO_VARIANTS) ## A timm and a Hugging Face classifier next to resnet18: eager, ONNX Runtime, OpenVINO, in process and served -> build/bench-zoo/
	$(PY) scripts/bench/bench.py --mode zoo --out build/bench-zoo

.PHONY: bench-seg
bench-seg: $(SEG_BENCH_INPUTS) ## Segmentation: torchvision lraspp under the kit and the stock image_segmenter (req/s, answer bytes); the shapes segmenter on TorchServe and Triton -> build/bench-seg/
	$(PY) scripts/bench/bench.py --mode segmentation --out build/bench-seg

.PHONY: bench-detr
bench-detr: model_store/hf_rtdetr.mar ## A DETR-family detector (seeded RT-DETR): served by the kit vs its network raw in process -> build/bench-detr/
	$(PY) scripts/bench/bench.py --mode detr --out build/bench-detr

.PHONY: bench-shapes
bench-shapes: model_store/shapes.mar model_store/shapes_onnx.mar model_store/shapes_openvino.mar $(TRITON_STAMP) ## The shapes detector (yolo path): raw in process, eager, ONNX and OpenVINO served, Triton; one size and mixed -> build/bench-shapes/
	$(PY) scripts/bench/bench.py --mode shapes --out build/bench-shapes

.PHONY: gpu-bench
gpu-bench: | $(STAMP) ## On a CUDA machine: eager fp32/fp16/compile/AOTInductor, nvJPEG vs Pillow, served stage times -> build/gpu/
	$(PY) scripts/bench/gpu_bench.py --out build/gpu

.PHONY: bench-quick
bench-quick: $(BENCH_INPUTS) ## Short benchmark (a few minutes) -> build/bench-quick/
	$(PY) scripts/bench/bench.py --mode quick --out build/bench-quick

# The Triton path: repositories generated from the same model folders and ONNX exports.
.PHONY: triton-repo
triton-repo: $(TRITON_STAMP) ## Generate model_repository/{cpu,gpu} (ensembles: kit preprocess -> ONNX model -> kit postprocess)

TRITON_MODELS := $(DEMOS) $(ZOO_DEMOS) hf_rtdetr
$(TRITON_STAMP): $(foreach m,$(TRITON_MODELS),$(ONNX_DIR)/$(m)/model.onnx) $(HANDLER_SRC) triton/servekit_step.py scripts/deploy/triton_repo.py
	$(PY) scripts/deploy/triton_repo.py $(TRITON_MODELS)
	touch $@

.PHONY: triton-serve
triton-serve: $(TRITON_STAMP) ## Start the bundled tritonserver on loopback over model_repository/cpu (HTTP 8000, gRPC 8001)
	$(PY) scripts/deploy/tritonctl.py start

.PHONY: triton-stop
triton-stop: ## Stop the tritonserver started by `make triton-serve`
	$(PY) scripts/deploy/tritonctl.py stop

.PHONY: scaffold
scaffold: | $(STAMP) ## New model folder from your file (format found from its content): NAME=<name> TASK=classification|detection|segmentation PT=<file> [ARCH=<torchvision name>|MODEL_FILE=<py> CLASS=<name>] [LABELS=<file>]
	@$(PY) scripts/packaging/scaffold_model.py --name "$(NAME)" --task "$(TASK)" --pt "$(PT)" --root "$(MODELS)" \
		$(if $(ARCH),--architecture "$(ARCH)") $(if $(MODEL_FILE),--model-file "$(MODEL_FILE)" --model-class "$(CLASS)") \
		$(if $(TORCHSCRIPT),--torchscript) $(if $(LABELS),--labels "$(LABELS)") $(if $(NUM_CLASSES),--num-classes $(NUM_CLASSES)) \
		$(if $(MAX_BATCH),--max-batch $(MAX_BATCH)) $(if $(SIZE),--input-size $(SIZE)) $(if $(FORCE),--force)

.PHONY: convert
convert: | $(STAMP) ## A whole pickled model -> state_dict (+ architecture) or torch.export program: PT=<file> OUT=<file> TRUST=1 [CODE=<dir of its classes>]
	@$(PY) scripts/packaging/convert_model.py --pt "$(PT)" --out "$(OUT)" $(if $(TRUST),--trust) $(if $(SIZE),--size $(SIZE)) $(if $(CODE),--code "$(CODE)")

# AOTInductor: the folder's network exported (dynamic batch 1..batchSize) and compiled to native code.
AOTI_DIR := build/aoti

.PHONY: aoti
aoti: $(if $(MODEL),$(STORE)/$(MODEL)_aoti.mar) ## AOTInductor package of MODEL=<name> -> build/aoti/<name>/model.pt2 and model_store/<name>_aoti.mar

$(AOTI_DIR)/%/model.pt2: $$(call folder_files,$(MODELS),$$*) scripts/packaging/compile_aoti.py $(HANDLER_SRC) | $(STAMP)
	$(PY) scripts/packaging/compile_aoti.py $* --models $(MODELS) --out $(AOTI_DIR)

$(STORE)/%_aoti.mar: $(AOTI_DIR)/%/model.pt2 $(HANDLER_SRC) scripts/packaging/archive_args.py
	$(call archive,$*_aoti,$* --models $(MODELS) --variant $<)

# The program that make aoti exported, served as it is (format exported), and the folder's model
# served with handler.compile (torch.compile at load, warmed up at every batch size).
$(AOTI_DIR)/%/program.pt2: $(AOTI_DIR)/%/model.pt2 ;

# Built graphs are kept (the bench and the tests read them), not deleted as intermediate files.
.PRECIOUS: $(AOTI_DIR)/%/model.pt2 $(AOTI_DIR)/%/program.pt2 $(ONNX_DIR)/%/model.onnx $(ONNX_DIR)/%/model.int8.onnx

$(STORE)/%_exported.mar: $(AOTI_DIR)/%/program.pt2 $(HANDLER_SRC) scripts/packaging/archive_args.py
	$(call archive,$*_exported,$* --models $(MODELS) --variant $<)

$(STORE)/%_compile.mar: $(MODELS)/%/model-config.yaml $$(call folder_files,$(MODELS),$$*) $(HANDLER_SRC) scripts/packaging/archive_args.py | $(STAMP)
	$(call archive,$*_compile,$* --models $(MODELS) --compile default)

# Beyond one machine (deploy/, README "Kubernetes and KServe"): manifests from the model folders, sized from
# the worker memory `make bench` measured (scripts/bench_results/results.json).
DEPLOY_MODELS ?= $(DEMOS)
.PHONY: k8s
k8s: | $(STAMP) ## Kubernetes manifests per model (Deployment, Service, HPA, PDB, NetworkPolicy) -> build/k8s/<model>/
	rm -rf build/k8s
	$(PY) scripts/deploy/deploy.py k8s --names $(DEPLOY_MODELS) --out build/k8s $(if $(IMAGE),--image $(IMAGE))

.PHONY: capacity
capacity: | $(STAMP) ## Replicas and HPA bounds for TARGET_RPS (default 200) per model, from make bench's results
	@$(PY) scripts/deploy/deploy.py capacity --names $(DEPLOY_MODELS) --target-rps $(or $(TARGET_RPS),200)

.PHONY: kserve
kserve: $(foreach m,$(DEPLOY_MODELS),$(STORE)/$(m).mar) $(TRITON_STAMP) ## KServe storage trees + InferenceServices + ServingRuntimes -> build/kserve/
	rm -rf build/kserve
	$(PY) scripts/deploy/deploy.py kserve --names $(DEPLOY_MODELS) --out build/kserve $(if $(IMAGE),--image $(IMAGE))

# Container images (deploy/, README "Container images"): Python packages from a wheelhouse pip fills on
# the host, a base image from Debian packages (mmdebstrap), the legacy builder with the host's network.
WHEELHOUSE := build/wheelhouse
BASE_IMAGE ?= servekit-base:bookworm
$(WHEELHOUSE)/.complete: deploy/requirements-serve.txt deploy/requirements-triton.txt | $(STAMP)
	mkdir -p $(WHEELHOUSE)
	$(VENV)/bin/pip download -q -d $(WHEELHOUSE) $(if $(WHEEL_PYTHON),--python-version $(WHEEL_PYTHON) --only-binary=:all:) \
		-r deploy/requirements-serve.txt -r deploy/requirements-triton.txt
	touch $@

.PHONY: wheelhouse
wheelhouse: $(WHEELHOUSE)/.complete ## Download the images' wheels on the host (WHEEL_PYTHON=3.10 for NVIDIA's Triton base)

.PHONY: base-image
base-image: ## Debian bookworm base image from Debian packages (mmdebstrap | docker import) -> $(BASE_IMAGE)
	docker image inspect $(BASE_IMAGE) >/dev/null 2>&1 || deploy/base-image.sh $(BASE_IMAGE)

.PHONY: image
image: $(WHEELHOUSE)/.complete $(foreach m,$(DEMOS),$(STORE)/$(m).mar) $(TRITON_STAMP) base-image ## Build the TorchServe and Triton images (BASE_IMAGE=...) -> build/docker/images.json
	$(PY) scripts/deploy/images.py build --base $(BASE_IMAGE) --models $(DEMOS)

.PHONY: image-run
image-run: ## Run the TorchServe image (WHICH=triton for Triton) on 127.0.0.1 ports of this host; prints endpoints
	$(PY) scripts/deploy/images.py run --which $(or $(WHICH),torchserve) --models $(DEMOS)

# Task metrics through a real server (scripts/eval/): the demo models' held-out splits in users' layouts, and
# make eval on any archive and labeled folder.
EVAL_DATA := build/data/.complete
$(EVAL_DATA): scripts/eval/eval_sets.py scripts/packaging/shapes.py scripts/packaging/letters.py scripts/packaging/demo_models.py | $(STAMP)
	$(PY) scripts/eval/eval_sets.py --out build/data
	touch $@

.PHONY: eval-data
eval-data: $(EVAL_DATA) ## The demo models' held-out splits as users hold them: ImageFolder (digits, letters), COCO JSON (shapes), index masks (shapes_seg) -> build/data/

.PHONY: eval
# DATA under build/data/ is the demo models' held-out splits: written first when missing.
# A model folder's archive is (re)built first; a name with no folder is left to the tool's one-line error.
DEMO_DATA = $(if $(filter build/data/%,$(DATA)),$(EVAL_DATA))
FOLDER_MAR = $(if $(wildcard $(MODELS)/$(MODEL)/model-config.yaml),$(STORE)/$(MODEL).mar)
eval: $(if $(MODEL),$(if $(filter triton,$(SERVER)),$(TRITON_STAMP),$(FOLDER_MAR))) $(DEMO_DATA) | $(STAMP) ## Task metric through a real server: MODEL=<name> DATA=<ImageFolder|CSV|COCO JSON|images+masks> [SERVER=triton] [LABEL_MAP=<file>] [IMAGES=<dir>] -> build/eval/<name>/
	@test -n "$(MODEL)" -a -n "$(DATA)" || { echo "usage: make eval MODEL=<name> DATA=<labeled data> [SERVER=torchserve|triton] (make eval-data writes the demo models' held-out splits under build/data/)"; exit 2; }
	@$(PY) scripts/eval/evaluate.py $(MODEL) "$(DATA)" --server $(or $(SERVER),torchserve) --store $(STORE) \
		$(if $(LABEL_MAP),--label-map "$(LABEL_MAP)") $(if $(IMAGES),--images "$(IMAGES)") $(if $(CONCURRENCY),--concurrency $(CONCURRENCY))

.PHONY: variants
variants: $(if $(and $(MODEL),$(filter models,$(MODELS))),$(FOLDER_MAR)) $(DEMO_DATA) | $(STAMP) ## Every variant measured by its task metric and speed through one TorchServe; the fastest within BUDGET becomes the folder's choice: MODEL=<name> DATA=<labeled data> [BUDGET=0.01|BUDGET_REL=0.01] [KINDS="eager onnx ..."] [SECONDS=10] -> build/variants/<name>/
	@test -n "$(MODEL)" -a -n "$(DATA)" || { echo "usage: make variants MODEL=<name> DATA=<labeled data> [BUDGET=0.01] (make eval-data writes the demo models' held-out splits under build/data/)"; exit 2; }
	@$(PY) scripts/eval/variants.py $(MODEL) "$(DATA)" --models $(MODELS) $(if $(BUDGET),--budget $(BUDGET)) $(if $(BUDGET_REL),--budget-rel $(BUDGET_REL)) \
		$(if $(KINDS),--kinds $(KINDS)) $(if $(SECONDS),--seconds $(SECONDS)) $(if $(CONCURRENCY),--concurrency $(CONCURRENCY)) \
		$(if $(LABEL_MAP),--label-map "$(LABEL_MAP)") $(if $(IMAGES),--images "$(IMAGES)") $(if $(VARIANTS_OUT),--out "$(VARIANTS_OUT)") \
		$(if $(BLANK_CALIBRATION),--blank-calibration) $(if $(filter 0,$(ACCURACY_CONTROL)),--no-accuracy-control)

# Compression on the user's images (scripts/packaging/prune.py, distill.py): new model folders that archive, serve
# and go through make variants like any other.
TRAINING = $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(LABEL_MAP),--label-map "$(LABEL_MAP)") --models $(MODELS)
.PHONY: prune
prune: $(DEMO_DATA) | $(STAMP) ## Structured channel pruning, then distillation from the unpruned model: MODEL=<name> DATA=<images, class folders optional> [TARGET=0.5] [EPOCHS=15] [ROUND_TO=16] [NAME=<name>_pruned] -> models/<name>_pruned/
	@test -n "$(MODEL)" -a -n "$(DATA)" || { echo "usage: make prune MODEL=<name> DATA=<images> [TARGET=0.5] (make eval-data writes build/data/letters/train)"; exit 2; }
	@$(PY) scripts/packaging/prune.py $(MODEL) --data "$(DATA)" $(TRAINING) $(if $(TARGET),--target $(TARGET)) \
		$(if $(ROUND_TO),--round-to $(ROUND_TO)) $(if $(NAME),--out-name $(NAME))

.PHONY: distill
distill: $(DEMO_DATA) | $(STAMP) ## A smaller architecture trained from a model's soft labels: TEACHER=<name> ARCH=<torchvision name|timm:name> DATA=<images> [EPOCHS=20] [NAME=<teacher>_<arch>] -> models/<NAME>/
	@test -n "$(TEACHER)" -a -n "$(ARCH)" -a -n "$(DATA)" || { echo "usage: make distill TEACHER=<name> ARCH=<student architecture> DATA=<images>"; exit 2; }
	@$(PY) scripts/packaging/distill.py $(TEACHER) --arch "$(ARCH)" --data "$(DATA)" $(TRAINING) $(if $(NAME),--name $(NAME))

# ExecuTorch (scripts/packaging/export_pte.py): the folder's network lowered to XNNPACK, for phones (docs/edge.md) and
# served as format executorch (<name>_pte.mar; <name>_pte_int8.mar with INT8=1).
PTE_DIR := build/pte
.PHONY: pte
pte: | $(STAMP) ## ExecuTorch program (XNNPACK) for phones and format executorch, checked and timed: MODEL=<name> [INT8=1] [DATA=<images>] -> build/pte/<name>/model.pte, preprocess.json; model_store/<name>_pte.mar
	@test -n "$(MODEL)" || { echo "usage: make pte MODEL=<name> [INT8=1] [DATA=<images to calibrate and check on>]"; exit 2; }
	@$(PY) scripts/packaging/export_pte.py $(MODEL) --models $(MODELS) --out $(PTE_DIR) $(if $(INT8),--int8) $(if $(DATA),--data "$(DATA)")
	@$(MAKE) --no-print-directory $(STORE)/$(MODEL)_pte$(if $(INT8),_int8).mar

$(PTE_DIR)/%/model.pte: $$(call folder_files,$(MODELS),$$*) scripts/packaging/export_pte.py | $(STAMP)
	$(PY) scripts/packaging/export_pte.py $* --models $(MODELS) --out $(PTE_DIR)

$(PTE_DIR)/%/model.int8.pte: $$(call folder_files,$(MODELS),$$*) scripts/packaging/export_pte.py | $(STAMP)
	$(PY) scripts/packaging/export_pte.py $* --models $(MODELS) --out $(PTE_DIR) --int8

$(STORE)/%_pte.mar: $(PTE_DIR)/%/model.pte $(HANDLER_SRC) scripts/packaging/archive_args.py
	$(call archive,$*_pte,$* --models $(MODELS) --variant $<)

$(STORE)/%_pte_int8.mar: $(PTE_DIR)/%/model.int8.pte $(HANDLER_SRC) scripts/packaging/archive_args.py
	$(call archive,$*_pte_int8,$* --models $(MODELS) --variant $<)

.PRECIOUS: $(PTE_DIR)/%/model.pte $(PTE_DIR)/%/model.int8.pte

.PHONY: qat
qat: $(DEMO_DATA) | $(STAMP) ## Quantization-aware int8 training (fake quant + distillation), PTQ beside it: MODEL=<name> DATA=<images> [EPOCHS=3] [NAME=<name>_qat] -> models/<name>_qat/
	@test -n "$(MODEL)" -a -n "$(DATA)" || { echo "usage: make qat MODEL=<name> DATA=<images> [EPOCHS=3] (make eval-data writes build/data/letters/train)"; exit 2; }
	@$(PY) scripts/packaging/qat.py $(MODEL) --data "$(DATA)" $(TRAINING) $(if $(NAME),--out-name $(NAME))

.PHONY: serve
serve: archive ## Start TorchServe on loopback with every archive (or NAMES="a b"), wait until healthy, print endpoints
	$(PY) scripts/serve/tsctl.py start $(if $(NAMES),--models $(NAMES))

.PHONY: predict
predict: | $(STAMP) ## Send images to a served model and print its answers: MODEL=<name> IMAGES="a.jpg b.png" [BACKEND=rest|grpc|triton] [PROTOCOL=http|grpc, with triton] [CONCURRENCY=8]
	$(if $(and $(MODEL),$(IMAGES)),,$(error give MODEL=<name> IMAGES="<image files>"))
	$(PY) scripts/serve/client.py --model $(MODEL) --backend $(or $(BACKEND),rest) --protocol $(or $(PROTOCOL),http) --concurrency $(or $(CONCURRENCY),1) $(IMAGES)

.PHONY: corpus
corpus: | $(STAMP) ## Print the bad-input corpus the tests send every model: each case, the status and the message expected
	$(PY) tests/support/corpus.py

.PHONY: stop
stop: ## Stop the TorchServe started by `make serve`, workers included
	$(PY) scripts/serve/tsctl.py stop

.PHONY: demo
demo: archive $(GRPC_STUBS) ## Build everything, serve, send real requests over REST and gRPC, print answers, stop
	$(PY) scripts/serve/demo.py

.PHONY: soak
soak: archive ## Soak: MINUTES (default 10) of concurrent good and bad requests on every model; statuses and worker memory
	$(PY) scripts/serve/soak.py --minutes $(or $(MINUTES),10)

.PHONY: lint
lint: | $(STAMP) ## ruff: lint (with a complexity limit) and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

.PHONY: test-fast
test-fast: lint archive ## The fast tier: the tests not marked e2e (unit and in-process handler tests)
	$(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)

.PHONY: test-zoo
test-zoo: lint $(STAMP) ## The zoo sweep: torchvision, timm and Hugging Face architectures served by one TorchServe against each owner's pipeline -> build/zoo-sweep.md
	ZOO_SWEEP=all $(PY) -m pytest -m zoo -s $(PYTEST_ARGS)

# What every test needs built first; `make -j2 test-inputs` builds it two steps at a time (.ci/run does)
.PHONY: test-inputs
test-inputs: lint archive $(GRPC_STUBS) $(BENCH_INPUTS) $(EVAL_DATA) $(STORE)/digits_pte.mar image

.PHONY: test
test: test-inputs ## Set up and run all tests (lint, unit, in-process handler, backends, real TorchServe end to end)
	$(PY) -m pytest --durations=25 $(PYTEST_ARGS)

.PHONY: clean
clean: ## Remove archives, build files and logs (keeps .venv and the models)
	rm -rf build logs tmp model_store/*.mar key_file.json scripts/serve/ts_grpc model_repository
