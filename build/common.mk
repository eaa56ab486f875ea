# Make settings shared by build/guest.mk and build/runtime.mk (included first by both):
# bash with -euo pipefail for every recipe, a failed target's file removed, no built-in
# rules; ROOT (the checkout) and B (build/) found from this file's own path.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DELETE_ON_ERROR:
.SUFFIXES:
MAKEFLAGS += --no-builtin-rules

ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))..)
B := $(ROOT)/build
