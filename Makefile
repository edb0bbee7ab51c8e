# The server's front door: `make run` builds and starts it on its defaults,
# `make test` runs every test. Every target ends on its own.

BIN       ?= server
FUZZTIME  ?= 30s
BENCHTIME ?= 1s
FUZZ      := FuzzClean FuzzParseCommand FuzzReadLine

.PHONY: build run test bench fuzz compare clean

build:
	go build -o $(BIN) .

run: build
	./$(BIN)

# The tests mostly wait (on sockets, on fake time): -parallel lets them
# wait together rather than two at a time on a machine of two cores.
test:
	go vet ./...
	go test -race -count=1 -parallel 16 ./...

bench:
	go test -run '^$$' -bench . -benchtime $(BENCHTIME) -count 1 .

fuzz:
	@for f in $(FUZZ); do \
		echo "== $$f ($(FUZZTIME))"; \
		go test -run '^$$' -fuzz "^$$f\$$" -fuzztime $(FUZZTIME) . || exit 1; \
	done

# The side-by-side measurement against the limit server (needs ../shared/bench).
compare: build
	../shared/bench/compare.sh ./$(BIN)

clean:
	rm -f $(BIN) *.test *.prof
