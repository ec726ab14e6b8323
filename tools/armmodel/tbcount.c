/*
 * tbcount: a QEMU TCG plugin that counts how often each translated block runs, per vCPU
 * (under qemu-user, a vCPU is a guest thread), and writes every block that ran with its
 * machine code, for tools/arm_model.py to price with llvm-mca.
 *
 *   qemu-aarch64 -plugin tbcount.so,out=FILE[,inline=on] ./program ...
 *
 * FILE: one line per block: `vaddr insns hexbytes vcpu:count[,vcpu:count...]`.
 * inline=on: QEMU adds to the counter itself instead of calling the plugin (several
 * times faster), but QEMU 7.2's inline counters are not per vCPU: every count is put
 * on vCPU 0 (and concurrent threads can lose increments), so it is for one thread.
 *
 * Built against qemu-plugin.h of the installed QEMU (7.2 on Debian 12, plugin API 1),
 * which tools/arm_model.py takes from Debian's qemu source package. Built against a
 * GPL header and loaded into QEMU, this file is GPL-2.0-or-later like QEMU's own plugins.
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <glib.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

/* More guest threads than this share counters modulo MAX_VCPUS (reported at exit). */
#define MAX_VCPUS 64

typedef struct {
    uint64_t vaddr;
    size_t insns;
    size_t bytes;
    uint8_t *code;
    uint64_t count[MAX_VCPUS];
} Block;

static GMutex lock;
static GHashTable *blocks; /* (vaddr, insns, bytes) -> Block */
static char *out_path;
static gboolean inline_counts;
static unsigned max_vcpu;

static guint64 key_of(uint64_t vaddr, size_t insns, size_t bytes)
{
    return vaddr ^ ((uint64_t)insns << 48) ^ ((uint64_t)bytes << 32);
}

/* One slot per vCPU: each vCPU writes only its own, so no lock on the hot path. */
static void on_exec(unsigned int vcpu, void *udata)
{
    Block *b = udata;
    b->count[vcpu % MAX_VCPUS]++;
    if (vcpu > max_vcpu) {
        max_vcpu = vcpu;
    }
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb), bytes = 0;
    uint64_t vaddr = qemu_plugin_tb_vaddr(tb);
    for (size_t i = 0; i < n; i++) {
        bytes += qemu_plugin_insn_size(qemu_plugin_tb_get_insn(tb, i));
    }
    guint64 key = key_of(vaddr, n, bytes);
    g_mutex_lock(&lock);
    Block *b = g_hash_table_lookup(blocks, &key);
    if (!b) {
        b = g_new0(Block, 1);
        b->vaddr = vaddr;
        b->insns = n;
        b->bytes = bytes;
        b->code = g_malloc(bytes ? bytes : 1);
        size_t at = 0;
        for (size_t i = 0; i < n; i++) {
            struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
            size_t sz = qemu_plugin_insn_size(insn);
            memcpy(b->code + at, qemu_plugin_insn_data(insn), sz);
            at += sz;
        }
        guint64 *k = g_new(guint64, 1);
        *k = key;
        g_hash_table_insert(blocks, k, b);
    }
    g_mutex_unlock(&lock);
    if (inline_counts) {
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->count[0], 1);
    } else {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, on_exec, QEMU_PLUGIN_CB_NO_REGS, b);
    }
}

static void write_blocks(qemu_plugin_id_t id, void *p)
{
    FILE *f = fopen(out_path, "w");
    if (!f) {
        perror(out_path);
        return;
    }
    g_mutex_lock(&lock);
    GHashTableIter it;
    gpointer k, v;
    g_hash_table_iter_init(&it, blocks);
    while (g_hash_table_iter_next(&it, &k, &v)) {
        Block *b = v;
        int any = 0;
        for (int c = 0; c < MAX_VCPUS; c++) {
            any |= b->count[c] != 0;
        }
        if (!any) {
            continue;
        }
        fprintf(f, "%" PRIx64 " %zu ", b->vaddr, b->insns);
        for (size_t i = 0; i < b->bytes; i++) {
            fprintf(f, "%02x", b->code[i]);
        }
        const char *sep = " ";
        for (int c = 0; c < MAX_VCPUS; c++) {
            if (b->count[c]) {
                fprintf(f, "%s%d:%" PRIu64, sep, c, b->count[c]);
                sep = ",";
            }
        }
        fputc('\n', f);
    }
    g_mutex_unlock(&lock);
    if (max_vcpu >= MAX_VCPUS) {
        fprintf(stderr, "tbcount: %u vCPUs, counters shared modulo %d\n", max_vcpu + 1,
                MAX_VCPUS);
    }
    fclose(f);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            out_path = g_strdup(argv[i] + 4);
        } else if (strcmp(argv[i], "inline=on") == 0) {
            inline_counts = TRUE;
        } else {
            fprintf(stderr, "tbcount: unknown option %s (out=FILE, inline=on)\n", argv[i]);
            return -1;
        }
    }
    if (!out_path) {
        fprintf(stderr, "tbcount: out=FILE is required\n");
        return -1;
    }
    blocks = g_hash_table_new(g_int64_hash, g_int64_equal);
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, write_blocks, NULL);
    return 0;
}
