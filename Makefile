# Two commands do everything: `make demo` and `make test`. Both create or reuse the virtual environment
# (outside the work tree, keyed by a hash of requirements.txt) and fetch the Kafka jars into ~/.m2.
SHELL := /bin/bash
VENV := $(shell bash scripts/venv.sh)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-unit venv kafka-start kafka-stop clean

demo:
	$(VENV)/bin/lsvcr demo $(ARGS)

# pytest exits 5 when a selection collects no test (e.g. ARGS="-k nothing"); make would turn it into 2.
test:
	@$(VENV)/bin/python -m pytest $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

test-unit:
	$(VENV)/bin/python -m pytest -m "not integration" $(ARGS)

venv:
	@echo $(VENV)

kafka-start:
	$(VENV)/bin/lsvcr kafka start

kafka-stop:
	$(VENV)/bin/lsvcr kafka stop

clean:
	-$(VENV)/bin/lsvcr kafka stop
	rm -rf .run
