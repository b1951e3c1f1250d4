#!/usr/bin/env bash
# Builds the database images `repo recover db` starts, from this host's own PostgreSQL and
# MariaDB installations, with `docker import` (no image registry is needed):
#   postgres:<major>   (e.g. postgres:15)    PATH holds /usr/lib/postgresql/<major>/bin
#   mariadb:<major>    (e.g. mariadb:10.11)  mariadbd, mariadb
# Each image holds the programs, the libraries they load (ldd closure), their share
# files, locales and zoneinfo, and /etc/passwd and /etc/group. Nothing else: no shell.
# Usage: scripts/build-db-images.sh [postgres] [mariadb]   (default: both that are installed)
set -euo pipefail

want=("$@")
[ ${#want[@]} -gt 0 ] || want=(postgres mariadb)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Every shared library the given ELF files load, and the loader.
libs_of() {
    for f in "$@"; do
        if file -L "$f" 2>/dev/null | grep -q ELF; then
            ldd "$f" 2>/dev/null | awk '/=> \//{print $3} /^\s*\/lib/{print $1}'
        fi
    done | sort -u
}

build() {
    local tag=$1 path_env=$2
    shift 2
    local list="$work/$tag.list"
    printf '%s\n' "$@" > "$list"
    local elves
    mapfile -t elves < <(for p in "$@"; do find "$p" -type f 2>/dev/null; done)
    libs_of "${elves[@]}" >> "$list"
    for f in /etc/passwd /etc/group /etc/nsswitch.conf /usr/lib/locale /usr/share/zoneinfo \
             /usr/lib/x86_64-linux-gnu/gconv /usr/share/i18n/charmaps/UTF-8.gz; do
        [ -e "$f" ] && echo "$f" >> "$list"
    done
    mkdir -p "$work/skel/tmp" "$work/skel/var/run" "$work/skel/run"
    chmod 1777 "$work/skel/tmp"
    # -h: store what symlinks point to (the image has no /lib -> usr/lib links).
    { tar -C / -chf - --ignore-failed-read -T "$list" 2>/dev/null || true; } > "$work/$tag.tar"
    tar -C "$work/skel" -rf "$work/$tag.tar" tmp var run
    docker import --change "ENV PATH=$path_env" --change "ENV LANG=C.UTF-8" \
        "$work/$tag.tar" "$tag" > /dev/null
    echo "built $tag ($(du -h "$work/$tag.tar" | cut -f1))"
}

for w in "${want[@]}"; do
    case $w in
    postgres)
        for dir in /usr/lib/postgresql/*/; do
            [ -x "$dir/bin/postgres" ] || continue
            major=$(basename "$dir")
            build "postgres:$major" "/usr/lib/postgresql/$major/bin:/usr/bin:/bin" \
                "/usr/lib/postgresql/$major" "/usr/share/postgresql/$major"
        done
        ;;
    mariadb)
        if [ -x /usr/sbin/mariadbd ]; then
            major=$(/usr/sbin/mariadbd --version | sed -E 's/.*Ver ([0-9]+\.[0-9]+).*/\1/')
            build "mariadb:$major" "/usr/sbin:/usr/bin:/bin" \
                /usr/sbin/mariadbd /usr/bin/mariadb /usr/bin/mariadb-admin \
                /usr/share/mysql /usr/share/mariadb /usr/lib/mysql/plugin
        fi
        ;;
    *) echo "unknown image $w (postgres, mariadb)" >&2; exit 2 ;;
    esac
done
