#!/usr/bin/env bash
# Build the luo-vmm reference guest: a Linux kernel with KHO + LUO + memfd preservation
# (patched for the emulation profile, see patches/), the upstream LUO selftests, and an
# uncompressed initramfs whose /init is the guest agent (agent/).
#
# Usage: guest-images/build.sh [--variant NAME] [--source DIR] [--print-dir|--print-key]
#
#   --variant NAME  a kernel variant: the reference source, config and patches plus
#                   variants/NAME/config (a Kconfig fragment) and variants/NAME/*.patch
#                   (see variants/README.md). Cached under its own key; built from a copy
#                   of the reference's object tree, so only what the variant changes is
#                   compiled again (the reference is built first if its tree is gone).
#   --source DIR    build the kernel from your own tree DIR instead of the Debian source,
#                   out of tree (make -C DIR O=<cache>/build/src-<hash of DIR's path>/obj;
#                   DIR is never written to and must be clean: no .config, no generated
#                   headers; make mrproper), with kernel.config (and, with --variant, only
#                   the variant's config fragment: a variant with patches is refused;
#                   apply them to DIR yourself), and with DIR's LUO selftests. Cached under
#                   <kernelversion>-src[-<variant>]-<hash of DIR's state, the configs and
#                   the build steps>: for a git tree HEAD, `git diff HEAD` and the untracked,
#                   non-ignored files' contents; else every file's path, size and mtime.
#                   The object tree is kept, so an edit recompiles only what it changes.
#   --print-dir     print the image directory of the last build (of that variant, or of
#                   that source tree) if its kernel inputs are unchanged and it is
#                   complete (exit 0), else exit 1; builds nothing.
#   --print-key     print the kernel's cache key (exit 0), builds nothing.
#
# Environment:
#   LUO_KERNEL_TARBALL=/path/linux-*.tar.*  use this kernel source instead of Debian's
#   LUO_KERNEL_REFRESH=1   ask Debian sid for a newer linux-source-* even if one is cached
#   LUO_KEEP_BUILD=0       delete the kernel build tree after a successful build
#   LUO_SELFTEST_CC=cc     compiler for the LUO selftests (default: musl-gcc if installed)
#   XDG_CACHE_HOME         the cache lives in ${XDG_CACHE_HOME:-$HOME/.cache}/luo-vmm
#   LUO_AGENT_TARGET_DIR   where cargo builds the agent (default: target/guest-agent)
#
# Cache layout (see docs/guest-image.md):
#   apt/                       private apt dir for Debian sid (sources.list, lists, cache, *.deb)
#   build/<kkey>/              kernel build tree and build.log (the reference's and the
#                              latest variant's are kept)
#   kernels/<kkey>/            vmlinux bzImage System.map kernel-version .config selftests/
#                              gen_init_cpio build.log   (<kkey> = <version>-<hash>)
#   initramfs/<ikey>.cpio      uncompressed newc initramfs (<ikey> = hash of its inputs)
#   images/<kkey>-<ikey>/      what the VMM needs: symlinks to the above
#   build/src-<phash>/         a --source tree's object tree (obj/) and build.log, kept
#   (a variant's <kkey> is <version>-<variant>-<hash>; a source tree's
#   <kernelversion>-src[-<variant>]-<hash>)
#
# All progress goes to stderr; the last line on stdout is `LUO_IMAGE_DIR=<dir>`.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/luo-vmm
APT_DIR=$CACHE/apt
MIN_KERNEL=6.19 # LUO was merged in 6.19
AGENT_TARGET=x86_64-unknown-linux-gnu
JOBS=$(nproc)

# The C compiler for the selftests: musl-gcc (Debian: musl-tools) when installed, else gcc
# with static glibc.
SELFTEST_CC=${LUO_SELFTEST_CC:-$(command -v musl-gcc || echo gcc)}

# Binaries built from tools/testing/selftests/liveupdate (see its Makefile).
SELFTESTS=(liveupdate luo_kexec_simple luo_multi_session luo_stress_sessions luo_stress_files)

# The variant being built (--variant), or empty for the reference kernel.
VARIANT=""
# The user's kernel tree (--source), or empty for the Debian source.
SOURCE=""

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}
sha() { sha256sum | cut -c1-16; }

# ---------------------------------------------------------------------------------------
# Kernel source: a user tarball, or the newest linux-source-* (>= 6.19) of Debian sid.
# Sets SRC_KIND (tarball|deb), SRC_FILE and KVER.
# ---------------------------------------------------------------------------------------

apt_opts() {
	echo "-o Dir::Etc::sourcelist=$APT_DIR/sources.list -o Dir::Etc::sourceparts=/dev/null" \
		"-o Dir::State::Lists=$APT_DIR/lists -o Dir::Cache=$APT_DIR/cache"
}

# Newest cached linux-source-*.deb with a version >= MIN_KERNEL, or nothing.
newest_cached_deb() {
	local f v best="" bestv=""
	for f in "$APT_DIR"/linux-source-*_all.deb; do
		[[ -e $f ]] || continue
		v=$(basename "$f" | sed -E 's/^linux-source-[^_]+_([^_]+)_all\.deb$/\1/')
		version_ge "$v" "$MIN_KERNEL" || continue
		if [[ -z $bestv ]] || version_ge "$v" "$bestv"; then
			best=$f bestv=$v
		fi
	done
	[[ -n $best ]] && echo "$best"
	return 0
}

version_ge() { [[ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" == "$2" ]]; }

download_debian_source() {
	mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
	echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" \
		>"$APT_DIR/sources.list"
	local A pkg
	A=$(apt_opts) # a list of words: used unquoted below
	log "apt-get update (Debian sid, private apt dir $APT_DIR)"
	# shellcheck disable=SC2086
	apt-get $A -q update >&2 || die "apt-get update for Debian sid failed"
	# shellcheck disable=SC2086
	pkg=$(apt-cache $A search --names-only '^linux-source-[0-9]+\.[0-9]+$' |
		awk '{print $1}' | sed 's/^linux-source-//' | sort -V | tail -n1)
	[[ -n $pkg ]] || die "Debian sid serves no linux-source-* package"
	version_ge "$pkg" "$MIN_KERNEL" || die "newest Debian linux-source-$pkg is older than $MIN_KERNEL"
	log "downloading linux-source-$pkg"
	# shellcheck disable=SC2086
	(cd "$APT_DIR" && apt-get $A -q download "linux-source-$pkg" >&2) ||
		die "apt-get download linux-source-$pkg failed"
}

pick_source() {
	if [[ -n ${LUO_KERNEL_TARBALL:-} ]]; then
		[[ -f $LUO_KERNEL_TARBALL ]] || die "LUO_KERNEL_TARBALL=$LUO_KERNEL_TARBALL: no such file"
		SRC_KIND=tarball
		SRC_FILE=$(readlink -f "$LUO_KERNEL_TARBALL")
		KVER=$(basename "$SRC_FILE" | sed -E 's/^linux-//; s/\.tar\..*$//; s/\.tgz$//')
		# A tarball name says little: its content hash is part of the key.
		KVER="$KVER-$(sha <"$SRC_FILE" | cut -c1-8)"
		return
	fi
	SRC_KIND=deb
	SRC_FILE=$(newest_cached_deb)
	if [[ -z $SRC_FILE || ${LUO_KERNEL_REFRESH:-0} == 1 ]]; then
		download_debian_source
		SRC_FILE=$(newest_cached_deb)
		[[ -n $SRC_FILE ]] || die "no linux-source-*.deb in $APT_DIR after download"
	fi
	# linux-source-7.2_7.2.13-1_all.deb -> 7.2.13-1 (Debian version, upstream 7.2.13)
	KVER=$(basename "$SRC_FILE" | sed -E 's/^linux-source-[^_]+_([^_]+)_all\.deb$/\1/')
}

# ---------------------------------------------------------------------------------------
# The kernel part. The text of these functions is part of the cache key.
# ---------------------------------------------------------------------------------------

# Extract SRC_FILE into $1 (which must not exist) so that $1 is the top of the tree.
kernel_extract() {
	local dst=$1 tmp
	tmp=$(mktemp -d "$dst.extract.XXXXXX")
	if [[ $SRC_KIND == deb ]]; then
		log "extracting $(basename "$SRC_FILE")"
		local inner
		inner=$(dpkg-deb -c "$SRC_FILE" | awk '{print $6}' | grep -E '^\./usr/src/linux-source-.*\.tar\.xz$' | head -n1)
		[[ -n $inner ]] || die "$SRC_FILE holds no usr/src/linux-source-*.tar.xz"
		dpkg-deb --fsys-tarfile "$SRC_FILE" | tar -xO "$inner" | tar -xJ -C "$tmp"
	else
		log "extracting $(basename "$SRC_FILE")"
		tar -xf "$SRC_FILE" -C "$tmp"
	fi
	local top
	top=$(find "$tmp" -mindepth 1 -maxdepth 1 -type d | head -n1)
	[[ -f $top/Makefile && -d $top/kernel ]] || die "no kernel tree in $SRC_FILE"
	mv "$top" "$dst"
	rmdir "$tmp"
}

kernel_patch() {
	local src=$1 p
	for p in "$HERE"/patches/*.patch; do
		[[ -e $p ]] || continue
		log "applying patches/$(basename "$p")"
		patch -d "$src" -p1 --forward --quiet <"$p" || die "patch $(basename "$p") does not apply"
	done
}

# tinyconfig + kernel.config + olddefconfig, then check that every option of the fragment
# kept the value asked for (Kconfig silently drops options whose dependencies are unmet).
kernel_configure() {
	local src=$1 buildlog=$2
	make -C "$src" tinyconfig >>"$buildlog" 2>&1 || die "make tinyconfig failed (see $buildlog)"
	cat "$HERE/kernel.config" >>"$src/.config"
	make -C "$src" olddefconfig >>"$buildlog" 2>&1 || die "make olddefconfig failed (see $buildlog)"
	verify_fragment "$src" "$HERE/kernel.config" "kernel.config"
}

# Checks that every option of fragment $2 kept its value in $1/.config (Kconfig silently
# drops options whose dependencies are unmet); $3 names the fragment in messages.
verify_fragment() {
	local src=$1 frag=$2 what=$3 bad=0 key want got
	while IFS='=' read -r key want; do
		got=$(grep -E "^$key=" "$src/.config" | cut -d= -f2- || true)
		if [[ $want == n ]]; then
			[[ -z $got || $got == n ]] && continue
		elif [[ $got == "$want" ]]; then
			continue
		fi
		log "config: $key=$want requested by $what, got '${got:-not set}'"
		bad=1
	done < <(grep -E '^CONFIG_[A-Za-z0-9_]+=' "$frag")
	[[ $bad == 0 ]] || die "$what: options lost by olddefconfig (unmet dependencies?)"
	log "config verified: every option of $what is set as asked"
}

# `make` with one progress line every 100 compiled files instead of the full output; the
# full output goes to the log, whose tail is shown on failure.
kernel_make() {
	local src=$1 buildlog=$2 what=$3 expect=$4
	shift 4
	local start=$SECONDS
	if ! make -C "$src" -j"$JOBS" "$@" 2>&1 | tee -a "$buildlog" |
		awk -v what="$what" -v expect="$expect" -v start="$start" '
			/^  (CC|AS|LD|AR|HOSTCC|OBJCOPY|LZ4|GEN|UPD)/ {
				n++
				if (n % 100 == 0) {
					printf "build.sh: %s: %d/~%d steps\n", what, n, expect > "/dev/stderr"
					fflush("/dev/stderr")
				}
			}
			END { printf "build.sh: %s: %d steps\n", what, n > "/dev/stderr" }'; then
		log "make $* failed; last lines of $buildlog:"
		tail -n 40 "$buildlog" >&2
		die "kernel build failed"
	fi
	log "$what done in $((SECONDS - start)) s"
}

kernel_build() {
	local src=$1 buildlog=$2 out=$3
	kernel_make "$src" "$buildlog" "kernel" 1500 vmlinux bzImage
	kernel_make "$src" "$buildlog" "headers" 200 headers
	# The upstream LUO selftests, linked statically (the initramfs has no libc). With musl
	# they are ~60 KiB each instead of ~700 KiB with glibc: every byte of the initramfs is
	# copied several times per handover by an emulated CPU.
	log "building the LUO selftests with $SELFTEST_CC"
	make -C "$src/tools/testing/selftests/liveupdate" CC="$SELFTEST_CC" LDFLAGS=-static \
		>>"$buildlog" 2>&1 || {
		tail -n 40 "$buildlog" >&2
		die "LUO selftests build failed"
	}
	mkdir -p "$out/selftests"
	local t
	for t in "${SELFTESTS[@]}"; do
		local bin=$src/tools/testing/selftests/liveupdate/$t
		[[ -x $bin ]] || die "selftest $t was not built"
		file "$bin" | grep -q 'statically linked' || die "selftest $t is not statically linked"
		cp "$bin" "$out/selftests/$t"
	done
	cc -O2 -o "$out/gen_init_cpio" "$src/usr/gen_init_cpio.c" >>"$buildlog" 2>&1 ||
		die "cannot build usr/gen_init_cpio"
	cp "$src/vmlinux" "$src/arch/x86/boot/bzImage" "$src/System.map" "$src/.config" "$out/"
	liveupdate_code "$src" "$src" "$out"
	make -s -C "$src" kernelrelease >"$out/kernel-version"
	cp "$buildlog" "$out/build.log"
}

# What `luo-vmm explore` searches (docs/explore.md): the function symbols of the LUO and
# KHO object files (`nm`: FILE FUNCTION per line) and those files' sources, whose
# definitions say which functions return an error.
liveupdate_code() {
	local src=$1 obj=$2 out=$3 o rel c
	mkdir -p "$out/liveupdate"
	: >"$out/liveupdate/functions"
	for o in "$obj"/kernel/liveupdate/*.o "$obj"/mm/memfd_luo.o; do
		[[ -f $o ]] || continue
		rel=${o#"$obj"/}
		c=${rel%.o}.c
		[[ -f $src/$c ]] || continue
		nm --defined-only "$o" | awk -v f="$c" '$2 ~ /^[Tt]$/ { print f, $3 }' >>"$out/liveupdate/functions"
		mkdir -p "$out/liveupdate/$(dirname "$c")"
		cp "$src/$c" "$out/liveupdate/$c"
	done
	[[ -s $out/liveupdate/functions ]] || die "no LUO/KHO object file (kernel/liveupdate/*.o, mm/memfd_luo.o) was built"
}

KERNEL_FUNCS=(kernel_extract kernel_patch kernel_configure verify_fragment kernel_make kernel_build liveupdate_code)

kernel_key() {
	local h
	h=$({
		cat "$HERE/kernel.config"
		cat "$HERE"/patches/*.patch 2>/dev/null || true
		declare -f "${KERNEL_FUNCS[@]}"
		printf '%s\n' "${SELFTESTS[@]}" "$SELFTEST_CC"
	} | sha)
	echo "$KVER-$h"
}

# ---------------------------------------------------------------------------------------
# Variants: the reference plus variants/NAME/config and variants/NAME/*.patch.
# ---------------------------------------------------------------------------------------

VARIANT_FUNCS=(variant_configure variant_build)

variant_dir() { echo "$HERE/variants/$VARIANT"; }

# The key of a variant: the reference's key, the variant's files, and how it is built.
variant_key() {
	local h d
	d=$(variant_dir)
	h=$({
		echo "$1"
		cat "$d/config" 2>/dev/null || true
		cat "$d"/*.patch 2>/dev/null || true
		declare -f "${VARIANT_FUNCS[@]}"
	} | sha)
	echo "$KVER-$VARIANT-$h"
}

check_variant() {
	[[ $VARIANT =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "--variant $VARIANT: not a variant name"
	local d
	d=$(variant_dir)
	if [[ ! -d $d ]]; then
		local known
		known=$(find "$HERE/variants" -mindepth 1 -maxdepth 1 -type d -printf '%f ' 2>/dev/null)
		die "no variant $VARIANT in $HERE/variants (known: ${known:-none})"
	fi
	[[ -f $d/README.md ]] || die "variant $VARIANT has no README.md saying what it changes"
	compgen -G "$d/*.patch" >/dev/null || [[ -f $d/config ]] ||
		die "variant $VARIANT has neither a config fragment nor a patch"
}

# Appends the variant's config fragment to an already configured tree, and checks that
# every option kept the value asked for.
variant_configure() {
	local src=$1 buildlog=$2 frag
	frag="$(variant_dir)/config"
	[[ -f $frag ]] || return 0
	cat "$frag" >>"$src/.config"
	make -C "$src" olddefconfig >>"$buildlog" 2>&1 || die "make olddefconfig failed (see $buildlog)"
	verify_fragment "$src" "$frag" "variant $VARIANT"
}

# Builds the variant in a copy of the reference's object tree ($1), so that make compiles
# only what the variant's patches and options change.
variant_build() {
	local ref=$1 src=$2 buildlog=$3 out=$4 p
	log "copying the reference build tree ($ref)"
	cp -a --reflink=auto "$ref" "$src"
	for p in "$(variant_dir)"/*.patch; do
		[[ -e $p ]] || continue
		log "applying variants/$VARIANT/$(basename "$p")"
		patch -d "$src" -p1 --forward --quiet <"$p" || die "variant patch $(basename "$p") does not apply"
	done
	variant_configure "$src" "$buildlog"
	kernel_build "$src" "$buildlog" "$out"
}

kernel_complete() {
	local d=$1 f
	for f in vmlinux bzImage System.map kernel-version gen_init_cpio liveupdate/functions; do
		[[ -s $d/$f ]] || return 1
	done
}

ensure_kernel() {
	KDIR=$CACHE/kernels/$KKEY
	# REBUILD_TREE=1: build even if the kernel is cached (a variant needs the reference's
	# object tree, which may have been deleted).
	if [[ ${REBUILD_TREE:-0} == 0 ]] && kernel_complete "$KDIR"; then
		log "kernel cached: $KDIR"
		return
	fi
	local bdir=$CACHE/build/$KKEY
	local src=$bdir/linux buildlog=$bdir/build.log
	# Whatever an interrupted run left is not trusted: start from a fresh tree.
	rm -rf "$bdir"
	mkdir -p "$bdir" "$CACHE/kernels"
	: >"$buildlog"
	local t0=$SECONDS out
	out=$(mktemp -d "$CACHE/kernels/.$KKEY.XXXXXX")
	if [[ -n $VARIANT ]]; then
		local ref=$CACHE/build/$REFKEY/linux
		if [[ ! -f $ref/vmlinux ]]; then
			log "variant $VARIANT starts from the reference's object tree, which is not kept: building the reference first"
			(VARIANT="" KKEY=$REFKEY LUO_KEEP_BUILD=1 REBUILD_TREE=1 ensure_kernel)
		fi
		log "building variant $VARIANT of $KVER (full log: $buildlog)"
		variant_build "$ref" "$src" "$buildlog" "$out"
	else
		kernel_extract "$src"
		kernel_patch "$src"
		kernel_configure "$src" "$buildlog"
		log "building kernel $KVER with $JOBS jobs (full log: $buildlog)"
		kernel_build "$src" "$buildlog" "$out"
	fi
	rm -rf "$KDIR"
	mv "$out" "$KDIR"
	log "kernel built in $((SECONDS - t0)) s: $KDIR"
	# Build trees are large: keep the reference's (variants start from it) and this one.
	local old
	for old in "$CACHE"/build/*; do
		# (Source trees' object trees, build/src-*, are theirs: kept.)
		[[ $old == "$bdir" || $old == "$CACHE/build/$REFKEY" || $old == "$CACHE"/build/src-* ]] ||
			rm -rf "$old"
	done
	if [[ ${LUO_KEEP_BUILD:-1} == 0 ]]; then rm -rf "$bdir"; fi
}

# ---------------------------------------------------------------------------------------
# Source trees (--source DIR): a kernel developer's own tree, built out of tree
# (make -C DIR O=<cache>), never written to. The text of these functions is part of the key.
# ---------------------------------------------------------------------------------------

SOURCE_FUNCS=(source_configure source_selftests source_build liveupdate_code)

# Refuses what cannot be built from $SOURCE: no kernel tree, a tree that kbuild would
# refuse for an out-of-tree build, a variant that carries patches.
check_source() {
	[[ -d $SOURCE ]] || die "--source $SOURCE: no such directory"
	SOURCE=$(cd "$SOURCE" && pwd -P)
	[[ -f $SOURCE/Makefile && -d $SOURCE/kernel ]] ||
		die "--source $SOURCE: not a kernel tree (no Makefile and kernel/ at its top)"
	# The same test as kbuild's `outputmakefile`, made before anything is built.
	local f dirty=()
	for f in .config include/config arch/x86/include/generated; do
		[[ -e $SOURCE/$f ]] && dirty+=("$f")
	done
	((${#dirty[@]} == 0)) ||
		die "--source $SOURCE is not clean for an out-of-tree build (it has ${dirty[*]}):" \
			"kbuild refuses it ('The source tree is not clean, please run make mrproper')." \
			"Save your .config if you need it, then run: make -C $SOURCE mrproper"
	if [[ -n $VARIANT ]] && compgen -G "$(variant_dir)/*.patch" >/dev/null; then
		die "--variant $VARIANT carries patches, which are never applied to a --source tree" \
			"(it is yours, and read-only here); apply them to $SOURCE yourself" \
			"(patch -p1 < $(variant_dir)/<patch>) and drop --variant." \
			"Only a variant's config fragment applies to a --source tree."
	fi
}

# The state of the tree: for a git tree, HEAD, the diff to it (binary-safe) and every
# untracked, non-ignored file with its content hash; otherwise every file's path, size
# and modification time. Reads only.
source_state() {
	if [[ -e $SOURCE/.git ]]; then
		local head
		head=$(git -C "$SOURCE" rev-parse HEAD 2>/dev/null) ||
			die "--source $SOURCE: git rev-parse HEAD failed (a repository without commits?)"
		echo "git $head"
		GIT_OPTIONAL_LOCKS=0 git -C "$SOURCE" diff --binary HEAD ||
			die "--source $SOURCE: git diff HEAD failed"
		echo "untracked:"
		(cd "$SOURCE" && git ls-files -z -o --exclude-standard |
			LC_ALL=C sort -z | xargs -0 -r sha256sum --)
	else
		echo "files:"
		find "$SOURCE" -printf '%P\t%s\t%T@\n' | LC_ALL=C sort
	fi
}

# <kernel version>-src[-<variant>]-<hash of the tree's state, the configs and the build
# steps>. The version is `make kernelversion` of the tree (VERSION.PATCHLEVEL.SUBLEVEL
# plus EXTRAVERSION: a LOCALVERSION is known only once configured).
source_key() {
	local ver h
	ver=$(make -s -C "$SOURCE" kernelversion 2>/dev/null) ||
		die "--source $SOURCE: 'make kernelversion' failed: not a kernel tree?"
	[[ $ver =~ ^[0-9A-Za-z._+-]+$ ]] || die "--source $SOURCE: odd kernel version '$ver'"
	h=$({
		source_state
		cat "$HERE/kernel.config"
		if [[ -n $VARIANT ]]; then cat "$(variant_dir)/config" 2>/dev/null || true; fi
		declare -f "${SOURCE_FUNCS[@]}" kernel_make verify_fragment variant_configure
		printf '%s\n' "${SELFTESTS[@]}" "$SELFTEST_CC"
	} | sha)
	echo "$ver-src${VARIANT:+-$VARIANT}-$h"
}

# The object tree of a source tree: one per source path, kept between builds, so that an
# edit recompiles only what it changes.
source_build_dir() { echo "$CACHE/build/src-$(printf '%s' "$SOURCE" | sha)"; }

# tinyconfig + kernel.config (+ the variant's fragment) + olddefconfig in the object tree
# $1, each option checked. A tree older than LUO (6.19) fails here, naming the options it
# lacks.
source_configure() {
	local obj=$1 buildlog=$2 ver
	make -C "$SOURCE" O="$obj" tinyconfig >>"$buildlog" 2>&1 || {
		tail -n 20 "$buildlog" >&2
		die "make tinyconfig failed in $obj (see $buildlog)"
	}
	cat "$HERE/kernel.config" >>"$obj/.config"
	make -C "$obj" olddefconfig >>"$buildlog" 2>&1 || die "make olddefconfig failed (see $buildlog)"
	ver=$(make -s -C "$SOURCE" kernelversion)
	if ! (verify_fragment "$obj" "$HERE/kernel.config" "kernel.config"); then
		version_ge "$ver" "$MIN_KERNEL" ||
			die "--source $SOURCE is Linux $ver: KHO and LUO need Linux $MIN_KERNEL or newer" \
				"(the options above are missing from its Kconfig)"
		die "--source $SOURCE (Linux $ver) cannot be configured as the reference guest:" \
			"the options above did not survive olddefconfig"
	fi
	variant_configure "$obj" "$buildlog"
}

# The LUO selftests of the tree, built in $1 (make -f with VPATH, so that no object file
# lands in the source tree), linked statically.
source_selftests() {
	local out=$1 buildlog=$2 obj=$3
	local dir=$SOURCE/tools/testing/selftests/liveupdate
	[[ -f $dir/Makefile ]] || die "--source $SOURCE has no $dir (no LUO selftests: Linux < $MIN_KERNEL?)"
	mkdir -p "$out"
	make -C "$out" -f "$dir/Makefile" -I "$dir" VPATH="$dir" OUTPUT="$out" \
		KHDR_INCLUDES="-isystem $obj/usr/include" CC="$SELFTEST_CC" LDFLAGS=-static \
		>>"$buildlog" 2>&1 || {
		tail -n 40 "$buildlog" >&2
		die "LUO selftests build failed"
	}
}

source_build() {
	local obj=$1 buildlog=$2 out=$3
	kernel_make "$obj" "$buildlog" "kernel" 1500 vmlinux bzImage
	kernel_make "$obj" "$buildlog" "headers" 200 headers
	log "building the LUO selftests of $SOURCE with $SELFTEST_CC"
	source_selftests "$obj/luo-selftests" "$buildlog" "$obj"
	mkdir -p "$out/selftests"
	local t
	for t in "${SELFTESTS[@]}"; do
		local bin=$obj/luo-selftests/$t
		[[ -x $bin ]] || die "selftest $t was not built"
		file "$bin" | grep -q 'statically linked' || die "selftest $t is not statically linked"
		cp "$bin" "$out/selftests/$t"
	done
	cc -O2 -o "$out/gen_init_cpio" "$SOURCE/usr/gen_init_cpio.c" >>"$buildlog" 2>&1 ||
		die "cannot build usr/gen_init_cpio"
	cp "$obj/vmlinux" "$obj/arch/x86/boot/bzImage" "$obj/System.map" "$obj/.config" "$out/"
	liveupdate_code "$SOURCE" "$obj" "$out"
	make -s -C "$obj" kernelrelease >"$out/kernel-version"
	cp "$buildlog" "$out/build.log"
}

# Builds the kernel of $SOURCE under $KKEY unless it is cached.
ensure_source_kernel() {
	KDIR=$CACHE/kernels/$KKEY
	if kernel_complete "$KDIR"; then
		log "kernel cached: $KDIR (tree state unchanged)"
		return
	fi
	local bdir obj buildlog t0=$SECONDS out
	bdir=$(source_build_dir)
	obj=$bdir/obj
	buildlog=$bdir/build.log
	mkdir -p "$obj" "$CACHE/kernels"
	echo "$SOURCE" >"$bdir/source"
	: >"$buildlog"
	out=$(mktemp -d "$CACHE/kernels/.$KKEY.XXXXXX")
	log "building $SOURCE out of tree in $obj with $JOBS jobs (full log: $buildlog)"
	source_configure "$obj" "$buildlog"
	source_build "$obj" "$buildlog" "$out"
	# The key says what was built only if the tree did not change meanwhile.
	local after
	after=$(source_key)
	if [[ $after != "$KKEY" ]]; then
		rm -rf "$out"
		die "$SOURCE changed while it was being built (key $KKEY, now $after): nothing was" \
			"cached; run the build again"
	fi
	rm -rf "$KDIR"
	mv "$out" "$KDIR"
	log "kernel built in $((SECONDS - t0)) s: $KDIR"
	if [[ ${LUO_KEEP_BUILD:-1} == 0 ]]; then rm -rf "$bdir"; fi
}

# ---------------------------------------------------------------------------------------
# The agent and the initramfs.
# ---------------------------------------------------------------------------------------

build_agent() {
	# A target dir of its own: the build may run while an outer cargo (cargo test, which
	# builds the image on first use) holds the workspace's target/ lock.
	local tdir=${LUO_AGENT_TARGET_DIR:-$REPO/target/guest-agent}
	log "building luo-agent (static, $AGENT_TARGET)"
	(cd "$REPO" && RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR=$tdir \
		cargo build --release -p luo-agent --target "$AGENT_TARGET" >&2) ||
		die "cargo build of luo-agent failed"
	AGENT=$tdir/$AGENT_TARGET/release/luo-agent
	file "$AGENT" | grep -Eq 'statically linked|static-pie linked' ||
		die "luo-agent is not statically linked: $(file "$AGENT")"
}

# gen_init_cpio description of the initramfs (uncompressed newc: decompression is very slow
# under emulation). $1: directory holding init, bzImage and selftests/.
initramfs_list() {
	local dir=$1 t
	cat <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /tmp 1777 0 0
dir /boot 0755 0 0
dir /selftests 0755 0 0
file /init $dir/init 0755 0 0
file /boot/bzImage $dir/bzImage 0644 0 0
EOF
	for t in "${SELFTESTS[@]}"; do
		echo "file /selftests/$t $dir/selftests/$t 0755 0 0"
	done
}

ensure_initramfs() {
	mkdir -p "$CACHE/initramfs"
	# Key: the layout and the content of every input file.
	IKEY=$({
		initramfs_list STAGE
		declare -f ensure_initramfs
		sha256sum "$AGENT" "$KDIR/bzImage" "$KDIR"/selftests/* | cut -d' ' -f1
	} | sha)
	INITRAMFS=$CACHE/initramfs/$IKEY.cpio
	if [[ -s $INITRAMFS ]]; then
		log "initramfs cached: $INITRAMFS"
		return
	fi
	# Stripped copies: every byte of the initramfs is unpacked (and, for kexec, copied and
	# loaded) by an emulated CPU.
	local stage tmp t
	stage=$(mktemp -d "$CACHE/initramfs/.stage.XXXXXX")
	mkdir "$stage/selftests"
	strip -s -o "$stage/init" "$AGENT"
	cp "$KDIR/bzImage" "$stage/bzImage"
	for t in "${SELFTESTS[@]}"; do
		strip -s -o "$stage/selftests/$t" "$KDIR/selftests/$t"
	done
	tmp=$(mktemp "$INITRAMFS.XXXXXX")
	"$KDIR/gen_init_cpio" - <<<"$(initramfs_list "$stage")" >"$tmp" || die "gen_init_cpio failed"
	rm -rf "$stage"
	mv "$tmp" "$INITRAMFS"
	log "initramfs built: $INITRAMFS ($(stat -c %s "$INITRAMFS") bytes, uncompressed)"
}

make_image_dir() {
	IMG=$CACHE/images/$KKEY-$IKEY
	if [[ ! -d $IMG ]]; then
		local tmp
		mkdir -p "$CACHE/images"
		tmp=$(mktemp -d "$CACHE/images/.$KKEY-$IKEY.XXXXXX")
		local f
		for f in vmlinux bzImage System.map kernel-version selftests liveupdate; do
			ln -s "$KDIR/$f" "$tmp/$f"
		done
		ln -s "$INITRAMFS" "$tmp/initramfs.cpio"
		chmod 755 "$tmp"
		mv "$tmp" "$IMG"
	fi
	echo "$IMG" >"$(last_image_file)"
}

# Where the last image directory of this variant (or of the reference, or of a source
# tree) is remembered.
last_image_file() {
	local src=""
	[[ -z $SOURCE ]] || src="-src-$(printf '%s' "$SOURCE" | sha)"
	echo "$CACHE/last-image-dir$src${VARIANT:+-$VARIANT}"
}

# Sets KKEY (and REFKEY, for the reference and its variants) from the options.
compute_key() {
	if [[ -n $SOURCE ]]; then
		KKEY=$(source_key)
		return
	fi
	REFKEY=$(kernel_key)
	KKEY=$REFKEY
	[[ -z $VARIANT ]] || KKEY=$(variant_key "$REFKEY")
}

main() {
	local print_dir=0 print_key=0
	while (($#)); do
		case "$1" in
		--print-dir) print_dir=1 ;;
		--print-key) print_key=1 ;;
		--variant)
			(($# >= 2)) || die "--variant needs a name"
			VARIANT=$2
			shift
			;;
		--source)
			(($# >= 2)) || die "--source needs a directory"
			SOURCE=$2
			[[ -n $SOURCE ]] || die "--source needs a directory"
			shift
			;;
		-h | --help)
			sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
			exit 0
			;;
		*) die "unknown argument $1 (try --help)" ;;
		esac
		shift
	done
	[[ -z $VARIANT ]] || check_variant
	[[ -z $SOURCE ]] || check_source

	if [[ $print_dir == 1 || $print_key == 1 ]]; then
		# Only offline sources: never download here.
		if [[ -z $SOURCE ]]; then
			if [[ -z ${LUO_KERNEL_TARBALL:-} && -z $(newest_cached_deb) ]]; then exit 1; fi
			LUO_KERNEL_REFRESH=0 pick_source
		fi
		compute_key
		if [[ $print_key == 1 ]]; then
			echo "$KKEY"
			exit 0
		fi
		local last img
		last=$(last_image_file)
		[[ -s $last ]] || exit 1
		img=$(cat "$last")
		[[ -e $img/initramfs.cpio ]] || exit 1
		[[ $(basename "$img") == "$KKEY"-* ]] || exit 1
		kernel_complete "$CACHE/kernels/$KKEY" || exit 1
		echo "$img"
		exit 0
	fi

	mkdir -p "$CACHE"
	# One kernel build at a time per cache: two would fight over the cores, and each
	# prunes build trees that are not its own or the reference's (a concurrent variant
	# build's among them). A build already cached takes the lock only to find it.
	exec {kernel_lock}>"$CACHE/.kernel-build.lock"
	if ! flock -n "$kernel_lock"; then
		log "waiting for another kernel build of this cache to finish"
		flock "$kernel_lock"
	fi
	if [[ -n $SOURCE ]]; then
		log "kernel source: $SOURCE (your tree, built out of tree; hashing its state)"
		compute_key
		log "kernel version: ${KKEY%%-src-*}${VARIANT:+, variant $VARIANT (config fragment)} (cache key $KKEY)"
		ensure_source_kernel
	else
		pick_source
		compute_key
		log "kernel source: $SRC_FILE ($SRC_KIND)"
		log "kernel version: $KVER${VARIANT:+, variant $VARIANT} (cache key $KKEY)"
		ensure_kernel
	fi
	flock -u "$kernel_lock"
	log "kernel release: $(cat "$KDIR/kernel-version")"
	build_agent
	ensure_initramfs
	make_image_dir
	log "image dir: $IMG"
	echo "LUO_IMAGE_DIR=$IMG"
}

main "$@"
