#!/usr/bin/env bash
# Build the inference image from the unmodified Dockerfile with podman and predict a small folder with it.
#
# For CI machines with no Docker daemon and no registry: the CPU variant's base (python:3.11-slim) is stood
# in for by a Debian bookworm made with debootstrap from the mirror apt uses, torch comes from a local
# wheelhouse (pip download: from local disk where the wheels are there), the rest of the package from PyPI.
# Needs root and apt. Run after `make test` (it uses .venv for the wheelhouse and the checks).
#
# Usage: docker/ci_build.sh [--no-predict]
#   --no-predict     stop after the image checks (until unetseg-predict and its weights exist)
# Environment: IMAGE (default localhost/unetseg:ci), WHEELHOUSE (default docker/wheelhouse, kept as a cache),
#   KEEP_IMAGE=1 to keep the built image, MIN_FREE_GIB (default 12: the free disk it checks for first), PYTHON (default .venv/bin/python), TORCH_PINS (default: the torch
#   and torchvision versions installed in .venv, which `make test` has just tested).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/unetseg:ci}
WHEELHOUSE=${WHEELHOUSE:-docker/wheelhouse}
PYTHON=${PYTHON:-.venv/bin/python}
KEEP_IMAGE=${KEEP_IMAGE:-0}
MIN_FREE_GIB=${MIN_FREE_GIB:-12}
WHEELHOUSE_PARENT=$(dirname "$WHEELHOUSE")
SUITE=bookworm
BASE=python:3.11-slim  # the CPU variant's FROM, as the README builds it
STANDIN=docker.io/library/$BASE
STANDIN_LABEL=unetseg.ci.standin
PREDICT=1
case "${1:-}" in
    "") ;;
    --no-predict) PREDICT=0 ;;
    *) echo "usage: $0 [--no-predict]" >&2; exit 2 ;;
esac

export CONTAINERS_CONF=$PWD/docker/containers.conf
WORK=$(mktemp -d /var/tmp/unetseg-ci.XXXXXX)
START=$SECONDS
STEP=""
STEP_START=$SECONDS

# debootstrap mounts /proc and /sys in its target: unmount them (deepest first) before deleting it.
unmount_under() {
    awk -v root="$1/" 'index($2, root) == 1 { print $2 }' /proc/self/mounts | sort -r | xargs -r -n1 umount -l
}

# Prints the time of the step before, then the name of the next one.
step() {
    if [ -n "$STEP" ]; then
        echo "==> ${STEP}: done in $((SECONDS - STEP_START)) s"
    fi
    STEP=$1
    STEP_START=$SECONDS
    echo
    echo "==> [$(date +%T)] $STEP"
}

cleanup() {
    local status=$?
    set +e
    [ -d "$WORK/rootfs" ] && unmount_under "$WORK/rootfs"
    rm -rf --one-file-system "$WORK"
    if [ "$KEEP_IMAGE" != 1 ] && podman image exists "$IMAGE" 2>/dev/null; then
        podman rmi -f "$IMAGE" >/dev/null
    fi
    if [ "$status" -ne 0 ]; then
        echo "==> FAILED during: ${STEP:-setup} (exit $status, after $((SECONDS - START)) s)" >&2
    else
        echo "==> all steps passed in $((SECONDS - START)) s"
    fi
    exit "$status"
}
trap cleanup EXIT

step "tools: podman, buildah, runc, debootstrap"
missing=()
for tool in podman buildah runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        podman buildah runc debootstrap >/dev/null
fi
podman --version
nofile=$(sed -n 's/.*"nofile=\([0-9]*\):.*/\1/p' "$CONTAINERS_CONF")
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$nofile" ]; then
    echo "ulimit -Hn is $hard, below nofile=$nofile in $CONTAINERS_CONF: lower it there" >&2
    exit 1
fi
[ -x "$PYTHON" ] || { echo "$PYTHON not found: run make test (or make venv) first" >&2; exit 1; }

step "free disk space (at least $MIN_FREE_GIB GiB)"
# The stand-in, the wheelhouse and the image (torch with its CUDA libraries) take several GiB: fail now,
# with the place to clean, rather than with "no space left on device" half-way through a build.
graphroot=$(podman info --format '{{.Store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers)
mkdir -p "$graphroot"
for place in "$WORK" "$graphroot" "$WHEELHOUSE_PARENT"; do
    free_gib=$(( $(df -Pk "$place" | awk 'NR == 2 { print $4 }') / 1024 / 1024 ))
    if [ "$free_gib" -lt "$MIN_FREE_GIB" ]; then
        echo "$place: $free_gib GiB free, the build needs $MIN_FREE_GIB (MIN_FREE_GIB); free some, e.g. podman image prune -af" >&2
        exit 1
    fi
    echo "$place: $free_gib GiB free"
done
# The image gets the torch that .venv has (minus a local label such as +cu130, which wheel names lack).
# Its wheels are cp311 ones, as the stand-in's python3 (bookworm's) is 3.11.
if [ -z "${TORCH_PINS:-}" ]; then
    TORCH_PINS=$("$PYTHON" -c '
from importlib.metadata import version
print(" ".join(name + "==" + version(name).split("+")[0] for name in ("torch", "torchvision")))')
fi
read -r -a TORCH_PINS <<<"$TORCH_PINS"
[ ${#TORCH_PINS[@]} -gt 0 ] || { echo "no torch pins (TORCH_PINS is empty)" >&2; exit 1; }
echo "torch for the image: ${TORCH_PINS[*]}"

step "stand-in base image $STANDIN (debootstrap $SUITE)"
if podman image exists "$STANDIN"; then
    echo "reusing $STANDIN ($(podman image inspect --format "{{index .Labels \"$STANDIN_LABEL\"}}" "$STANDIN"))"
else
    # The mirror apt already uses: the first Debian one in deb822 .sources or one-line .list files.
    mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -v -e security -e '^$' | head -n1 || true)
    if [ -z "$mirror" ]; then
        mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk -v suite="$SUITE" '$1 == "deb" { sub(/\[[^]]*\] */, ""); if ($3 == suite) { print $2; exit } }' || true)
    fi
    mirror=${mirror:-http://deb.debian.org/debian}
    echo "mirror: $mirror"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates,passwd \
        "$SUITE" "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }
    # This machine's own CAs (a TLS-inspecting proxy): pip in the build fails verification without them.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$WORK/rootfs/usr/local/share/ca-certificates/"
        chroot "$WORK/rootfs" update-ca-certificates >/dev/null
    fi
    # Debian's pip may trust only certifi's bundle; point it at the system one that now has those CAs.
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$WORK/rootfs/etc/pip.conf"
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" --one-file-system -c . \
        | podman import --change 'CMD ["python3"]' \
            --change "LABEL $STANDIN_LABEL=\"debootstrap $SUITE minbase, $(date -u +%F)\"" - "$STANDIN" >/dev/null
    unmount_under "$WORK/rootfs"
    rm -rf --one-file-system "$WORK/rootfs"
fi
podman run --rm --network none "$STANDIN" python3 --version

step "wheelhouse $WHEELHOUSE: ${TORCH_PINS[*]}"
mkdir -p "$WHEELHOUSE"
"$PYTHON" -m pip download --dest "$WHEELHOUSE" --only-binary=:all: "${TORCH_PINS[@]}" >"$WORK/pip-download.log" 2>&1 \
    || { tail -n 30 "$WORK/pip-download.log" >&2; exit 1; }
du -sh "$WHEELHOUSE"

step "podman build $IMAGE (BASE=$BASE, torch from the wheelhouse)"
podman build --pull=never --network host --layers=false --force-rm \
    --volume "$(realpath "$WHEELHOUSE"):/wheelhouse:ro" \
    --build-arg BASE="$BASE" \
    --build-arg TORCH="--no-index --find-links /wheelhouse ${TORCH_PINS[*]}" \
    --tag "$IMAGE" --file Dockerfile .
podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$IMAGE"

step "image checks: torch imports offline, default user is not root"
podman run --rm --network none --entrypoint python "$IMAGE" \
    -c 'import torch, unetseg; print("torch", torch.__version__, "cuda", torch.version.cuda)'
uid=$(podman run --rm --network none --entrypoint id "$IMAGE" -u)
echo "default uid: $uid"
[ "$uid" != 0 ] || { echo "the image runs as root" >&2; exit 1; }

if [ "$PREDICT" = 1 ]; then
    step "predict a generated folder: unetseg-predict /data/in /data/out --model nuclei --device cpu"
    "$PYTHON" -c 'import sys; from unetseg.synthetic import make_nuclei_dataset
make_nuclei_dataset(sys.argv[1], count=3, shape=(192, 256), seed=7)' "$WORK/data"
    mkdir -m 0777 "$WORK/out"  # written by the image's non-root user
    podman run --rm --network none "$IMAGE" --help >/dev/null  # the default command: ENTRYPOINT plus --help
    podman run --rm --network none \
        --volume "$WORK/data/images:/data/in:ro" --volume "$WORK/out:/data/out" \
        "$IMAGE" /data/in /data/out --model nuclei --device cpu
    "$PYTHON" docker/check_masks.py "$WORK/data/images" "$WORK/out" "$WORK/data/masks"
else
    step "predict: SKIPPED (--no-predict)"
fi

step "cleanup"
