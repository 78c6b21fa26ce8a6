# make demo: venv + install + float training, QAT, int8 engines (numpy, oneDNN, ONNX Runtime), the comparison
#            table and the report (plots) on the synthetic set
# make test: venv + install + the test suite (CIFAR-10 integration test when ../shared has the data)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := runs/demo

.PHONY: demo test lint clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,onnx]"
	$(PY) -m pip install -q --no-deps "onnxruntime==1.17.3"
	touch $@

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(PY) scripts/train_fp32.py --config configs/synthetic_tiny.yaml --out $(DEMO) --name fp32
	$(PY) scripts/train_qat.py --config configs/synthetic_tiny.yaml --pretrained $(DEMO)/fp32 --out $(DEMO) --name qat
	$(PY) scripts/sim_int8_infer.py --qat $(DEMO)/qat --export $(DEMO)/qat/model.int8.npz --engine all --onnx $(DEMO)/qat/model.qdq.onnx
	$(PY) scripts/compare.py --float $(DEMO)/fp32 --qat $(DEMO)/qat --calib 500
	$(PY) scripts/report.py $(DEMO)/fp32 $(DEMO)/qat
	@echo "demo runs are in $(DEMO)/ (fp32, qat); int8 checks $(DEMO)/qat/int8_eval.json, table $(DEMO)/qat/compare.md"
	@echo "report: $(DEMO)/qat/report.md (plots: $(DEMO)/qat/*.png)"

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check train_quantization scripts tests

clean:
	rm -rf $(VENV) .cache runs *.egg-info
