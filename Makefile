# The server's front door: `make run` builds and starts it (flags in ARGS:
# make run ARGS="-idle 10s"), `make test` runs every test. Every target
# ends on its own.

BIN       ?= server
ARGS      ?=
FUZZTIME  ?= 30s
BENCHTIME ?= 1s
FUZZ      := FuzzClean FuzzParseCommand FuzzCut FuzzTelnet
# RACE=require makes a missing race detector an error, not a skip (CI).
RACE      ?= auto

.PHONY: build run test bench fuzz clean

# Quiet, so that a bad flag through `make run` prints the server's one
# line (and make's own "Error 2" after it).
build:
	@go build -buildvcs=auto -o $(BIN) .

run: build
	@./$(BIN) $(ARGS)

# The race detector needs cgo, and cgo a C compiler: where there is none
# (go env CGO_ENABLED says 0), the tests run without it, and say so.
# The tests mostly wait (on sockets, on fake time): -parallel lets them
# wait together rather than two at a time on a machine of two cores.
test:
	@if [ "$$(go env CGO_ENABLED)" = 1 ]; then race="-race "; \
	elif [ "$(RACE)" = require ]; then \
		echo "make test: the race detector needs cgo and a C compiler (go env CGO_ENABLED is 0)"; exit 1; \
	else \
		race=""; echo "make test: no race detector: it needs cgo and a C compiler (go env CGO_ENABLED is 0)"; \
	fi; \
	echo "go vet ./..."; go vet ./... || exit 1; \
	echo "go test $${race}-count=1 -parallel 16 ./..."; \
	if [ -n "$$race" ]; then echo "  (a first run compiles the race detector's runtime: a minute or two before the result)"; fi; \
	go test $${race}-count=1 -parallel 16 ./...

bench:
	go test -run '^$$' -bench . -benchtime $(BENCHTIME) -count 1 .

fuzz:
	@for f in $(FUZZ); do \
		echo "== $$f ($(FUZZTIME))"; \
		go test -run '^$$' -fuzz "^$$f\$$" -fuzztime $(FUZZTIME) . || exit 1; \
	done

clean:
	rm -f $(BIN) *.test *.prof
