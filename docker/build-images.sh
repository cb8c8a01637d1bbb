#!/usr/bin/env bash
# Build the scoring image (default tag batchscore-scoring:latest), or with
# --gpu its GPU variant (batchscore-scoring:gpu) on an NVIDIA CUDA runtime base,
# or with --airflow the Airflow image of the compose stack (batchscore-airflow:latest).
#
# Works both where a container registry can be reached and where none can:
#   1. If the image already carries the label batchscore.build-hash=<hash of
#      Dockerfile + requirements + base (+ the project's code for --airflow)>,
#      stop at once (cached run).
#   2. Base: BASE_IMAGE (python:3.11-slim) if it is here or can be pulled,
#      else batchscore-base:bookworm, a Debian bookworm root file system made
#      with debootstrap and imported into Docker (made once, then reused).
#   3. Wheels are downloaded by pip on the HOST, since pip inside a build
#      container cannot reach the package index on our machines; air-gapped
#      sites point BATCHSCORE_WHEELS_DIR at a folder of wheels instead.
#   4. docker build from a context holding the Dockerfile and the wheels.
# --gpu (docker/scoring-gpu/Dockerfile, the same wheels): the base is
# CUDA_BASE_IMAGE, present or pulled, with no fallback (the build fails at
# once, naming CUDA_BASE_IMAGE, when it cannot be had); Python 3.11 is a
# python-build-standalone archive, downloaded on the host (pinned, sha256
# checked) into docker/.cache/python, or given in BATCHSCORE_PYTHON_TARBALL.
# --airflow (docker/airflow/Dockerfile): Airflow 3.3.2 with every pin of
# requirements.lock, on the same base as the CPU image; its wheels go to
# docker/.cache/airflow-wheels (or BATCHSCORE_AIRFLOW_WHEELS_DIR). The image
# holds a copy of dags/, plugins/ and include/ (not the example's generated
# model/ and data*/), so a change of that code also makes it stale.
#
# Usage: docker/build-images.sh [--gpu | --airflow] [--force] [--help]
#   --gpu     build the GPU variant instead of the CPU image
#   --airflow build the Airflow image instead of the scoring image
#   --force   rebuild even if the image is up to date (no Docker layer cache)
# Environment:
#   IMAGE                    tag to build (batchscore-scoring:latest; :gpu with
#                            --gpu; batchscore-airflow:latest with --airflow)
#   BASE_IMAGE               preferred base (python:3.11-slim)
#   CUDA_BASE_IMAGE          base of the GPU variant, a CUDA runtime image
#                            (nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04)
#   BATCHSCORE_PYTHON_TARBALL  GPU variant: a python-build-standalone
#                            install_only archive of CPython 3.11 (x86_64 gnu);
#                            then nothing is downloaded
#   BATCHSCORE_PYTHON_URL, BATCHSCORE_PYTHON_SHA256  where that archive is
#                            downloaded from otherwise, and its checksum
#   BATCHSCORE_WHEELS_DIR    folder of ready wheels; then nothing is downloaded
#   BATCHSCORE_AIRFLOW_WHEELS_DIR  --airflow: folder of ready wheels for
#                            requirements.lock and async-timeout (cp311,
#                            manylinux x86_64); then nothing is downloaded
#   BATCHSCORE_PULL_TIMEOUT  seconds allowed for pulling the base (60)
#   DEBIAN_MIRROR            mirror for debootstrap (http://deb.debian.org/debian)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly CPU_CONTEXT="${SCRIPT_DIR}/scoring"
readonly GPU_CONTEXT="${SCRIPT_DIR}/scoring-gpu"
readonly AIRFLOW_CONTEXT="${SCRIPT_DIR}/airflow"
readonly SCORING_REQUIREMENTS="${CPU_CONTEXT}/requirements.txt"   # both scoring images
readonly PROJECT_DIR="${SCRIPT_DIR%/*}"
readonly AIRFLOW_REQUIREMENTS="${PROJECT_DIR}/requirements.lock"
# The project's folders the Airflow image holds a copy of (in /opt/batchscore).
readonly PROJECT_FOLDERS=(dags plugins include)
# Wheels the Airflow image may need beyond requirements.lock. `make lock`
# freezes the tree as resolved on the host's Python (3.11.7), whose markers
# can differ from the base's: Debian bookworm's python3 is 3.11.2, on which
# redis needs async-timeout (python_full_version < "3.11.3"). They are only
# downloaded next to the lock's wheels; pip installs one only where a marker
# asks for it (not on python:3.11-slim, a later 3.11).
readonly AIRFLOW_EXTRA_WHEELS=("async-timeout==5.0.1")
readonly CACHE_DIR="${SCRIPT_DIR}/.cache"

IMAGE="${IMAGE:-}"   # default set by configure: :latest, or :gpu with --gpu
BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
CUDA_BASE_IMAGE="${CUDA_BASE_IMAGE:-nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04}"
# CPython 3.11 for the GPU variant: python-build-standalone's install_only
# archive for x86_64-unknown-linux-gnu (needs glibc 2.17+, any CUDA base).
readonly PYTHON_URL="${BATCHSCORE_PYTHON_URL:-https://github.com/indygreg/python-build-standalone/releases/download/20240909/cpython-3.11.10%2B20240909-x86_64-unknown-linux-gnu-install_only_stripped.tar.gz}"
readonly PYTHON_SHA256="${BATCHSCORE_PYTHON_SHA256:-2f8fdc87e8aab1f9f166575e3379d36abd0f7a87ea6c66c5e97e3aaadedd291d}"
readonly FALLBACK_BASE="batchscore-base:bookworm"
readonly DEBIAN_SUITE="bookworm"   # its python3 is 3.11, as the cp311 wheels need
readonly DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
readonly DEBOOTSTRAP_INCLUDE="python3,python3-venv,ca-certificates"
readonly PULL_TIMEOUT="${BATCHSCORE_PULL_TIMEOUT:-60}"
readonly HASH_LABEL="batchscore.build-hash"
readonly RECIPE_LABEL="batchscore.base-recipe"
# Bump when the way this script builds changes without the Dockerfile changing.
readonly BUILD_LOGIC_VERSION=1

FORCE=0
GPU=0
AIRFLOW=0
KIND=""             # set by configure: "scoring image" or "airflow image", in messages
CONTEXT_SRC=""      # set by configure: the folder of the Dockerfile
REQUIREMENTS=""     # set by configure: the pins the wheels are for
EXTRA_WHEELS=()     # set by configure: requirements downloaded besides them
WHEELS_CACHE=""     # set by configure: where prepare_wheels downloads them
WHEELS_GIVEN=""     # set by configure: the folder of ready wheels, if any
WHEELS_GIVEN_VAR="" # set by configure: the variable that names it
REQUESTED_BASE=""   # set by configure: BASE_IMAGE, or CUDA_BASE_IMAGE with --gpu
BASE_ARG=""         # set by configure: the Dockerfile's build argument for it
WORK_DIR=""   # scratch folder of one build, made after the cache check

log() { echo "[build-images] $*" >&2; }
die() { echo "[build-images] ERROR: $*" >&2; exit 1; }

# The scratch folder goes away on any exit. A debootstrap that failed half
# way can leave /proc, /sys or a bind mount of /dev inside the root file
# system: unmount those first, and never let rm cross into another file system.
cleanup() {
    [[ -n "$WORK_DIR" && -d "$WORK_DIR" ]] || return 0
    local m
    while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done < <(awk -v p="$WORK_DIR/" 'index($2, p) == 1 { print $2 }' /proc/mounts | sort -r)
    rm -rf --one-file-system -- "$WORK_DIR" || log "could not remove $WORK_DIR"
}
trap cleanup EXIT

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

parse_args() {
    while (($#)); do
        case "$1" in
            --force) FORCE=1 ;;
            --gpu) GPU=1 ;;
            --airflow) AIRFLOW=1 ;;
            -h|--help) usage; exit 0 ;;
            *) die "unknown argument: $1 (see --help)" ;;
        esac
        shift
    done
}

# Which image: the CPU one, with --gpu its GPU variant, with --airflow the
# Airflow image (on the CPU image's base).
configure() {
    ((GPU && AIRFLOW)) && die "--gpu and --airflow exclude each other"
    KIND="scoring image"
    REQUIREMENTS="$SCORING_REQUIREMENTS"
    WHEELS_CACHE="$CACHE_DIR/wheels"
    WHEELS_GIVEN_VAR="BATCHSCORE_WHEELS_DIR"
    if ((GPU)); then
        CONTEXT_SRC="$GPU_CONTEXT"
        IMAGE="${IMAGE:-batchscore-scoring:gpu}"
        REQUESTED_BASE="$CUDA_BASE_IMAGE"
        BASE_ARG="CUDA_BASE_IMAGE"
    elif ((AIRFLOW)); then
        KIND="airflow image"
        CONTEXT_SRC="$AIRFLOW_CONTEXT"
        IMAGE="${IMAGE:-batchscore-airflow:latest}"
        REQUESTED_BASE="$BASE_IMAGE"
        BASE_ARG="BASE_IMAGE"
        REQUIREMENTS="$AIRFLOW_REQUIREMENTS"
        EXTRA_WHEELS=("${AIRFLOW_EXTRA_WHEELS[@]}")
        WHEELS_CACHE="$CACHE_DIR/airflow-wheels"
        WHEELS_GIVEN_VAR="BATCHSCORE_AIRFLOW_WHEELS_DIR"
    else
        CONTEXT_SRC="$CPU_CONTEXT"
        IMAGE="${IMAGE:-batchscore-scoring:latest}"
        REQUESTED_BASE="$BASE_IMAGE"
        BASE_ARG="BASE_IMAGE"
    fi
    WHEELS_GIVEN="${!WHEELS_GIVEN_VAR:-}"
    readonly CONTEXT_SRC IMAGE REQUESTED_BASE BASE_ARG GPU AIRFLOW KIND REQUIREMENTS \
        EXTRA_WHEELS WHEELS_CACHE WHEELS_GIVEN WHEELS_GIVEN_VAR
}

sha256_of_stdin() { sha256sum | cut -d' ' -f1; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

image_id() { docker image inspect --format '{{.Id}}' "$1"; }

image_label() {
    # Prints nothing (not "<no value>") when the image has no such label.
    docker image inspect --format "{{with .Config.Labels}}{{index . \"$2\"}}{{end}}" "$1" \
        2>/dev/null || true
}

# The fallback base is made again when its recipe (the code of
# build_fallback_base and its settings) changes; the recipe hash is stored as
# a label on it.
base_recipe_hash() {
    { echo "$DEBIAN_SUITE $DEBOOTSTRAP_INCLUDE"; declare -f build_fallback_base; } | sha256_of_stdin
}

# The base that is usable without the network, or nothing. Checking only
# local images keeps the cached path fast and offline.
local_base() {
    if ((GPU)); then
        if image_exists "$CUDA_BASE_IMAGE"; then echo "$CUDA_BASE_IMAGE"; fi
    elif image_exists "$BASE_IMAGE"; then
        echo "$BASE_IMAGE"
    elif image_exists "$FALLBACK_BASE" \
        && [[ "$(image_label "$FALLBACK_BASE" "$RECIPE_LABEL")" == "$(base_recipe_hash)" ]]; then
        echo "$FALLBACK_BASE"
    fi
}

# The files of the project that go into the Airflow image, NUL-separated,
# relative to PROJECT_DIR, sorted: PROJECT_FOLDERS without what is made
# locally (the examples' model/ and data*/ folders, __pycache__, .pyc files).
project_files() {
    (cd "$PROJECT_DIR" && find "${PROJECT_FOLDERS[@]}" \
        -type d \( -name __pycache__ -o -path 'include/examples/*/model' \
                   -o -path 'include/examples/*/data*' \) -prune \
        -o -name '*.pyc' -prune \
        -o \( -type f -o -type l \) -print0 | LC_ALL=C sort -z)
}

# The content of those files as they are in the working tree (not git's
# index: uncommitted edits go into the image, so they must change the hash
# too), with their names and modes. A few dozen small files: milliseconds.
project_hash() {
    (cd "$PROJECT_DIR" && project_files | xargs -0 -r sha256sum -- \
        && project_files | xargs -0 -r stat -c '%a %n' --) | sha256_of_stdin
}

# Hash of everything the image is made of: the Dockerfile, the pinned
# requirements, the base asked for, and the base used, by name and by image
# id (a re-made or re-pulled base means a new scoring image); for the Airflow
# image also the project's code it holds.
build_hash() {
    local base="$1"
    {
        echo "logic=$BUILD_LOGIC_VERSION"
        if ((AIRFLOW)); then echo "image=airflow"; fi
        echo "requested=$REQUESTED_BASE"
        echo "base=$base $(image_id "$base")"
        echo "--- Dockerfile"; cat "$CONTEXT_SRC/Dockerfile"
        echo "--- ${REQUIREMENTS##*/}"; cat "$REQUIREMENTS"
        if ((${#EXTRA_WHEELS[@]})); then echo "--- extra wheels ${EXTRA_WHEELS[*]}"; fi
        if ((GPU)); then echo "--- python.tar.gz $(python_sha256)"; fi
        if ((AIRFLOW)); then echo "--- project $(project_hash)"; fi
    } | sha256_of_stdin
}

is_up_to_date() {
    local base
    base="$(local_base)"
    [[ -n "$base" ]] && image_exists "$IMAGE" \
        && [[ "$(image_label "$IMAGE" "$HASH_LABEL")" == "$(build_hash "$base")" ]]
}

# Runs started at the same time (parallel test sessions, make -j, two
# people) would each build and race on the tags and the wheel folder. One
# builds; the others wait for it and then find the image up to date.
take_build_lock() {
    if ! command -v flock >/dev/null 2>&1; then
        log "flock not found (util-linux); concurrent runs are not serialised"
        return 0
    fi
    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/build.lock"
    if ! flock -n 9; then
        log "another build-images.sh is running; waiting for it"
        flock 9
    fi
}

exit_if_up_to_date() {
    if ((!FORCE)) && is_up_to_date; then
        echo "$KIND $IMAGE is up to date"
        exit 0
    fi
}

ensure_debootstrap() {
    command -v debootstrap >/dev/null 2>&1 && return 0
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        die "debootstrap is needed to make a base image without a registry; install it (Debian/Ubuntu: apt-get install debootstrap) and run again as root"
    fi
    log "installing debootstrap with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >&2 \
        || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y --no-install-recommends debootstrap >&2; } \
        || die "could not install debootstrap with apt-get"
}

# Debian bookworm with python3 and venv, made with debootstrap and imported.
build_fallback_base() {
    [[ "$(id -u)" == 0 ]] || die "making $FALLBACK_BASE with debootstrap needs root; run as root, or make $BASE_IMAGE available (docker load / a reachable registry)"
    ensure_debootstrap
    local rootfs="$WORK_DIR/rootfs"

    log "making $FALLBACK_BASE with debootstrap ($DEBIAN_SUITE from $DEBIAN_MIRROR, about a minute)"
    local dlog="$CACHE_DIR/debootstrap.log" started=$SECONDS
    if ! debootstrap --variant=minbase --include="$DEBOOTSTRAP_INCLUDE" \
            "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$dlog" 2>&1; then
        tail -n 20 "$dlog" >&2
        [[ -f "$rootfs/debootstrap/debootstrap.log" ]] && tail -n 20 "$rootfs/debootstrap/debootstrap.log" >&2
        die "debootstrap failed (full output in $dlog)"
    fi
    log "debootstrap done in $((SECONDS - started))s"

    # Keep the image small (as Debian's own slim images do: no apt caches,
    # manuals, translations; of the docs only the copyright files) and free
    # of this host's settings.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/tmp/* \
        "$rootfs"/debootstrap "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/usr/share/locale/*
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
    # ...and packages installed later in the image stay slim too.
    printf '%s\n' 'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
        'path-exclude /usr/share/locale/*' 'path-exclude /usr/share/doc/*' \
        'path-include /usr/share/doc/*/copyright' \
        > "$rootfs/etc/dpkg/dpkg.cfg.d/batchscore-slim"
    : > "$rootfs/etc/resolv.conf"    # Docker mounts its own at run time
    echo "batchscore" > "$rootfs/etc/hostname"

    log "importing the root file system as $FALLBACK_BASE"
    tar --numeric-owner -C "$rootfs" -c . \
        | docker import \
            --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
            --change "ENV LANG=C.UTF-8" \
            --change "LABEL $RECIPE_LABEL=$(base_recipe_hash)" \
            --change 'CMD ["python3"]' \
            - "$FALLBACK_BASE" >/dev/null \
        || die "docker import of the root file system failed"
    rm -rf --one-file-system -- "$rootfs"   # ~200 MB; no need to wait for the exit
}

# Prints the base to build from: local BASE_IMAGE, else pulled, else the
# debootstrap fallback (made if missing). With --gpu: CUDA_BASE_IMAGE, local
# or pulled, or the build stops here, before any download.
# Prints IMAGE when it is here or can be pulled; else returns 1 with the
# reason in PULL_ERROR (call it directly, not in $(...), to see that).
local_or_pulled() {
    local image=$1 out
    if image_exists "$image"; then
        log "base: $image (present locally)"
        echo "$image"; return
    fi
    log "pulling $image (at most ${PULL_TIMEOUT}s)"
    if out="$(timeout "$PULL_TIMEOUT" docker pull --quiet "$image" 2>&1)"; then
        log "base: $image (pulled)"
        echo "$image"; return
    fi
    [[ -n "$out" ]] || out="no answer in ${PULL_TIMEOUT}s"
    PULL_ERROR="${out##*$'\n'}"
    return 1
}

resolve_base() {
    if ((GPU)); then resolve_cuda_base; return; fi
    local_or_pulled "$BASE_IMAGE" && return
    log "cannot pull $BASE_IMAGE: $PULL_ERROR"
    log "falling back to $FALLBACK_BASE"
    if [[ "$(local_base)" == "$FALLBACK_BASE" ]]; then
        log "base: $FALLBACK_BASE (present locally)"
    else
        build_fallback_base
        log "base: $FALLBACK_BASE (made)"
    fi
    echo "$FALLBACK_BASE"
}

# A CUDA base cannot be made here as Debian's can: it is pulled, or loaded by
# hand (docker load), or the build fails with what to do.
resolve_cuda_base() {
    local_or_pulled "$CUDA_BASE_IMAGE" && return
    die "cannot pull the GPU image's base $CUDA_BASE_IMAGE (build argument CUDA_BASE_IMAGE): $PULL_ERROR
  The GPU image has no fallback base. Make a CUDA runtime image available here
  (docker pull where a registry answers, or docker save on another machine and
  docker load -i here), or set CUDA_BASE_IMAGE to one that is present
  (docker images nvidia/cuda). It must be a CUDA runtime image without a driver."
}

# The python-build-standalone archive: given, cached, or downloaded now.
python_tarball() {
    if [[ -n "${BATCHSCORE_PYTHON_TARBALL:-}" ]]; then
        echo "$BATCHSCORE_PYTHON_TARBALL"
    else
        echo "$CACHE_DIR/python/cpython-$PYTHON_SHA256.tar.gz"
    fi
}

# Part of the GPU image's build hash: the given archive's checksum, or the
# pinned one (a download is checked against it before it is kept).
python_sha256() {
    if [[ -n "${BATCHSCORE_PYTHON_TARBALL:-}" ]]; then
        sha256_of_stdin < "$BATCHSCORE_PYTHON_TARBALL"
    else
        echo "$PYTHON_SHA256"
    fi
}

# Prints the archive to put into the build context, downloading it if needed.
prepare_python() {
    local file
    file="$(python_tarball)"
    if [[ -n "${BATCHSCORE_PYTHON_TARBALL:-}" ]]; then
        log "python: $file (given, no download)"
    elif [[ -f "$file" ]]; then
        log "python: $file (already downloaded)"
    else
        command -v curl >/dev/null 2>&1 \
            || die "curl is needed to download Python for the GPU image; or set BATCHSCORE_PYTHON_TARBALL"
        mkdir -p "${file%/*}"
        log "python: downloading $PYTHON_URL"
        local err
        if ! err="$(curl --fail --silent --show-error --location --connect-timeout 20 \
                --max-time 600 --output "$file.part" "$PYTHON_URL" 2>&1)"; then
            rm -f "$file.part"
            die "cannot download Python 3.11 for the GPU image from $PYTHON_URL: ${err##*$'\n'}
  Download a python-build-standalone install_only archive of CPython 3.11 for
  x86_64-unknown-linux-gnu where you can and set BATCHSCORE_PYTHON_TARBALL to
  its path (or BATCHSCORE_PYTHON_URL and BATCHSCORE_PYTHON_SHA256 to a mirror)."
        fi
        local got
        got="$(sha256_of_stdin < "$file.part")"
        if [[ "$got" != "$PYTHON_SHA256" ]]; then
            rm -f "$file.part"
            die "the download from $PYTHON_URL has sha256 $got, not $PYTHON_SHA256 (BATCHSCORE_PYTHON_SHA256)"
        fi
        mv "$file.part" "$file"
    fi
    # A clear message now rather than a failed RUN in the middle of the build.
    tar -tzf "$file" python/bin/python3 >/dev/null 2>&1 \
        || die "$file is not a python-build-standalone install_only archive (no python/bin/python3 in it)"
    echo "$file"
}

# Wheels of the pins for CPython 3.11 on manylinux x86_64, downloaded on the
# host whatever the host's own platform (portable: the same folder serves
# any x86_64 host). Binary wheels only: every pin of
# docker/scoring/requirements.txt has one, and so has every pin of
# requirements.lock (checked for Airflow 3.3.2: 160 pins, 131 pure Python,
# 29 cp311/abi3 manylinux, no sdist-only one), so pip wheel, which builds on
# and for this host, is only the fallback below.
download_wheels() {
    local dir="$1"
    python3 -m pip download --quiet --disable-pip-version-check \
        --only-binary=:all: --python-version 3.11 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 \
        -d "$dir" -r "$REQUIREMENTS" "${EXTRA_WHEELS[@]}" >&2
}

# True when wheels built on this host fit the base image: CPython 3.11 on
# Linux x86_64 with a glibc no newer than bookworm's 2.36 (the fallback base).
host_fits_base() {
    python3 - <<'PY' 2>/dev/null
import os, platform, sys
glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
ok = (sys.version_info[:2] == (3, 11) and sys.platform == "linux"
      and platform.machine() == "x86_64" and glibc.startswith("glibc ")
      and tuple(map(int, glibc.split()[1].split(".")[:2])) <= (2, 36))
sys.exit(0 if ok else 1)
PY
}

# Prints the folder holding the wheels for REQUIREMENTS: the given one, the
# cache (when made from the same pins), or the cache filled now.
prepare_wheels() {
    local req="$REQUIREMENTS"
    if [[ -n "$WHEELS_GIVEN" ]]; then
        log "wheels: from $WHEELS_GIVEN (no download)"
        echo "$WHEELS_GIVEN"; return
    fi
    local dir="$WHEELS_CACHE" stamp want started=$SECONDS
    stamp="$dir/.requirements.sha256"
    want="$({ cat "$req"; if ((${#EXTRA_WHEELS[@]})); then echo "${EXTRA_WHEELS[*]}"; fi; } | sha256_of_stdin)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        log "wheels: $dir (already downloaded)"
        echo "$dir"; return
    fi
    if ! python3 -m pip --version >/dev/null 2>&1; then
        die "python3 with pip is needed on the host to download wheels (or set $WHEELS_GIVEN_VAR)"
    fi
    # A fresh folder: wheels of older pins must not linger and be picked up.
    rm -rf "$dir"; mkdir -p "$dir"
    log "wheels: downloading for cp311 manylinux x86_64 into $dir"
    local how="downloaded"
    if ! download_wheels "$dir"; then
        # Only the Airflow tree (a long one, re-pinned by `make lock`) may
        # one day pin a package published as an sdist only. Then pip wheel
        # builds that one here (and downloads the others' wheels for this
        # host), which is right only where the host's Python and glibc fit
        # the base image; elsewhere the wheels must be brought in.
        ((AIRFLOW)) && host_fits_base \
            || die "pip download failed; check access to the package index, or set $WHEELS_GIVEN_VAR"
        log "wheels: no binary wheel for every pin (or no index); trying pip wheel for this host"
        rm -rf "$dir"; mkdir -p "$dir"
        python3 -m pip wheel --quiet --disable-pip-version-check \
            --wheel-dir "$dir" -r "$req" "${EXTRA_WHEELS[@]}" >&2 \
            || die "pip wheel failed too; check access to the package index, or set $WHEELS_GIVEN_VAR"
        how="downloaded or built (pip wheel)"
    fi
    echo "$want" > "$stamp"
    log "wheels: $(find "$dir" -name '*.whl' | wc -l) $how in $((SECONDS - started))s"
    echo "$dir"
}

# Dockerfile + wheels/ (with requirements.txt) in the scratch folder, for
# the GPU image python.tar.gz, for the Airflow image project/.
make_context() {
    local wheels="$1" python="${2:-}" ctx="$WORK_DIR/context"
    mkdir -p "$ctx/wheels"
    cp "$CONTEXT_SRC/Dockerfile" "$ctx/"
    compgen -G "$wheels/*.whl" >/dev/null || die "no wheels (*.whl) in $wheels"
    # Hard links where the wheels are on the same file system: no 125 MB copy.
    if ! cp -l "$wheels"/*.whl "$ctx/wheels/" 2>/dev/null; then
        rm -f "$ctx"/wheels/*.whl
        cp "$wheels"/*.whl "$ctx/wheels/" || die "cannot copy the wheels from $wheels"
    fi
    cp "$REQUIREMENTS" "$ctx/wheels/"
    if [[ -n "$python" ]]; then
        cp -l "$python" "$ctx/python.tar.gz" 2>/dev/null || cp "$python" "$ctx/python.tar.gz" \
            || die "cannot copy $python into the build context"
    fi
    if ((AIRFLOW)); then
        # A copy, not hard links: the modes are normalised (readable by all,
        # writable by none but root) without touching the working tree.
        mkdir -p "$ctx/project"
        (cd "$PROJECT_DIR" && project_files | tar --null --no-recursion -T - -cf -) \
            | tar -C "$ctx/project" -xf - \
            || die "cannot copy ${PROJECT_FOLDERS[*]} into the build context"
        chmod -R u+rwX,go+rX,go-w "$ctx/project"
    fi
    echo "$ctx"
}

main() {
    parse_args "$@"
    configure
    command -v docker >/dev/null 2>&1 || die "docker is not installed"
    docker info >/dev/null 2>&1 || die "cannot reach the Docker engine (is it running? are you allowed to use it?)"
    [[ -f "$CONTEXT_SRC/Dockerfile" && -f "$REQUIREMENTS" ]] \
        || die "missing $CONTEXT_SRC/Dockerfile or $REQUIREMENTS"
    if [[ -n "$WHEELS_GIVEN" && ! -d "$WHEELS_GIVEN" ]]; then
        die "$WHEELS_GIVEN_VAR=$WHEELS_GIVEN is not a folder"
    fi
    if ((GPU)) && [[ -n "${BATCHSCORE_PYTHON_TARBALL:-}" && ! -f "$BATCHSCORE_PYTHON_TARBALL" ]]; then
        die "BATCHSCORE_PYTHON_TARBALL=$BATCHSCORE_PYTHON_TARBALL is not a file"
    fi

    exit_if_up_to_date
    take_build_lock
    exit_if_up_to_date   # a run we waited for may have built it meanwhile

    # Under the cache folder, so the wheels can be hard-linked into the context.
    mkdir -p "$CACHE_DIR"
    WORK_DIR="$(mktemp -d "$CACHE_DIR/work.XXXXXX")"

    local base python="" wheels ctx hash
    base="$(resolve_base)"
    if ((GPU)); then python="$(prepare_python)"; fi
    wheels="$(prepare_wheels)"
    # The hash before the copy: a file edited in between then makes the image
    # look stale next time (a rebuild), never up to date with old content.
    hash="$(build_hash "$base")"
    ctx="$(make_context "$wheels" "$python")"
    log "build hash: $hash"

    local build_args=(--build-arg "$BASE_ARG=$base" --label "$HASH_LABEL=$hash" -t "$IMAGE")
    ((FORCE)) && build_args+=(--no-cache)
    log "docker build -t $IMAGE from $base"
    local started=$SECONDS
    # The legacy builder is enough (and the only one without the buildx plugin).
    DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build "${build_args[@]}" "$ctx" >&2 \
        || die "docker build of $IMAGE failed (see the output above)"
    log "docker build done in $((SECONDS - started))s; all done in ${SECONDS}s"

    echo "$KIND $IMAGE built ($(image_id "$IMAGE"))"
}

main "$@"
