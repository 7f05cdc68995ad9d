PY ?= python3
SETUP = $(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint

setup:  ## install beautytag (editable) with its dependencies
	$(SETUP) -e .

demo: setup  ## start the service and its web page on the shipped model: http://127.0.0.1:8000/
	beautytag serve --host 127.0.0.1 --port 8000

test:  ## the README's test command
	$(SETUP) -e ".[dev]" && $(PY) -m pytest -q

lint:
	ruff check .
