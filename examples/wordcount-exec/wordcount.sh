#!/bin/sh
# Counts lines, words and bytes of the payload.
set -eu
wc | awk '{ printf "{\"lines\": %d, \"words\": %d, \"bytes\": %d}\n", $1, $2, $3 }'
