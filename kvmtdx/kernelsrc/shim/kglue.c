/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * kvmtdx kernel-source backend: the glue between the extracted kernel code
 * and Python.  Appended after the extracted code, so it can use its types
 * (struct kvm_tdx, struct td_params, struct tdx_sys_info) and its static
 * functions.  Every exported name starts with kt_; see backend.py.
 *
 * One host is current during a call (kt_cur): the extracted code keeps its
 * module information in one global (tdx_sysinfo), as the kernel does.
 */

#define KT_EXPORT __attribute__((visibility("default")))
#define KT_MAX_KEYS 1024

enum kt_seamcall {
	KT_MNG_CREATE = 1,
	KT_MNG_KEY_CONFIG = 2,
	KT_MNG_ADDCX = 3,
	KT_MNG_INIT = 4,
	KT_MR_FINALIZE = 5,
};

/* in: the call's operands; out[0]: the extended error (RCX).  Returns the status. */
typedef u64 (*kt_seamcall_fn)(int fn, const u64 *in, int nin, u64 *out);

struct kt_host {
	struct tdx_sys_info sysinfo;
	u64 supported_xcr0;
	u64 supported_xss;
	bool ept_5level;
	kt_seamcall_fn seamcall;
	int key_first;
	int key_count;
	int keys_free;
	unsigned char key_used[KT_MAX_KEYS];
	long allocations;
	long warnings;
	char last_warning[64];
};

struct kvm_caps kvm_caps;
static struct kt_host *kt_cur;

struct kt_vm {
	struct kvm_tdx tdx;
};

static void kt_enter(struct kt_host *h)
{
	kt_cur = h;
	tdx_sysinfo = &h->sysinfo;
	kvm_caps.supported_xcr0 = h->supported_xcr0;
	kvm_caps.supported_xss = h->supported_xss;
}

void kt_warn(const char *where)
{
	if (!kt_cur)
		return;
	kt_cur->warnings++;
	snprintf(kt_cur->last_warning, sizeof(kt_cur->last_warning), "%s", where);
}

bool kt_access_ok(const void *addr, size_t size)
{
	/* mmap_min_addr below, the 4-level user address space above. */
	uintptr_t a = (uintptr_t)addr;

	return a >= 0x10000 && size <= 0x7FFFFFFFF000ULL && a <= 0x7FFFFFFFF000ULL - size;
}

void *kzalloc(size_t size, gfp_t flags)
{
	void *p = calloc(1, size ? size : 1);

	if (p && kt_cur)
		kt_cur->allocations++;
	return p;
}

void kfree(const void *p)
{
	if (p && kt_cur)
		kt_cur->allocations--;
	free((void *)p);
}

struct page *alloc_page(gfp_t flags)
{
	return kzalloc(sizeof(struct page), flags);
}

void __free_page(struct page *page)
{
	kfree(page);
}

void kvm_vm_bugged(struct kvm *kvm)
{
	kvm->vm_bugged = true;
	kvm->vm_dead = true;
}

bool cpu_has_vmx_ept_5levels(void)
{
	return kt_cur->ept_5level;
}

int tdx_guest_keyid_alloc(void)
{
	int i;

	for (i = 0; i < kt_cur->key_count; i++) {
		if (!kt_cur->key_used[i]) {
			kt_cur->key_used[i] = 1;
			kt_cur->keys_free--;
			return kt_cur->key_first + i;
		}
	}
	return -ENOSPC;
}

void tdx_guest_keyid_free(unsigned int keyid)
{
	int i = (int)keyid - kt_cur->key_first;

	if (i < 0 || i >= kt_cur->key_count || !kt_cur->key_used[i]) {
		kt_warn("tdx_guest_keyid_free");
		return;
	}
	kt_cur->key_used[i] = 0;
	kt_cur->keys_free++;
}

u32 tdx_get_nr_guest_keyids(void)
{
	return kt_cur->key_count;
}

static u64 kt_call(int fn, const u64 *in, int nin, u64 *rcx)
{
	u64 out[1] = { 0 };
	u64 status = kt_cur->seamcall(fn, in, nin, out);

	if (rcx)
		*rcx = out[0];
	return status;
}

u64 tdh_mng_create(struct tdx_td *td, u16 hkid)
{
	u64 in[1] = { hkid };

	return kt_call(KT_MNG_CREATE, in, 1, NULL);
}

u64 tdh_mng_key_config(struct tdx_td *td)
{
	return kt_call(KT_MNG_KEY_CONFIG, NULL, 0, NULL);
}

u64 tdh_mng_addcx(struct tdx_td *td, struct page *tdcs_page)
{
	return kt_call(KT_MNG_ADDCX, NULL, 0, NULL);
}

u64 tdh_mng_init(struct tdx_td *td, u64 td_params, u64 *extended_err)
{
	/* TD_PARAMS as the module reads it: header words, then one row per CPUID_CONFIG. */
	const struct td_params *p = (const struct td_params *)(uintptr_t)td_params;
	int n = tdx_sysinfo->td_conf.num_cpuid_config;
	u64 in[6 + 2 * 128];
	int i;

	in[0] = p->attributes;
	in[1] = p->xfam;
	in[2] = p->max_vcpus;
	in[3] = p->eptp_controls;
	in[4] = p->config_flags;
	in[5] = n;
	for (i = 0; i < n; i++) {
		const struct tdx_cpuid_value *v = &p->cpuid_values[i];

		in[6 + 2 * i] = v->eax | (u64)v->ebx << 32;
		in[7 + 2 * i] = v->ecx | (u64)v->edx << 32;
	}
	return kt_call(KT_MNG_INIT, in, 6 + 2 * n, extended_err);
}

u64 tdh_mng_rd(struct tdx_td *td, u64 field, u64 *data)
{
	*data = 0;
	return 0;
}

u64 tdh_mr_finalize(struct tdx_td *td)
{
	return kt_call(KT_MR_FINALIZE, NULL, 0, NULL);
}

const struct tdx_sys_info *tdx_get_sysinfo(void)
{
	return &kt_cur->sysinfo;
}

int kvm_find_user_return_msr(u32 msr)
{
	return 0;
}

void tdx_mmu_release_hkid(struct kvm *kvm)
{
	struct kvm_tdx *kvm_tdx = to_kvm_tdx(kvm);

	if (kvm_tdx->hkid > 0)
		tdx_hkid_free(kvm_tdx);
}

void tdx_reclaim_td_control_pages(struct kvm *kvm)
{
	struct kvm_tdx *kvm_tdx = to_kvm_tdx(kvm);
	int i;

	if (kvm_tdx->hkid > 0)
		return; /* the kernel leaks the pages rather than reclaim them under a key */
	if (kvm_tdx->td.tdcs_pages) {
		for (i = 0; i < kvm_tdx->td.tdcs_nr_pages; i++)
			if (kvm_tdx->td.tdcs_pages[i])
				__free_page(kvm_tdx->td.tdcs_pages[i]);
		kfree(kvm_tdx->td.tdcs_pages);
		kvm_tdx->td.tdcs_pages = NULL;
	}
	if (kvm_tdx->td.tdr_page) {
		__free_page(kvm_tdx->td.tdr_page);
		kvm_tdx->td.tdr_page = NULL;
	}
}

/* ------------------------------------------------------------------------
 * What Python calls.
 */

KT_EXPORT struct kt_host *kt_host_new(void)
{
	return calloc(1, sizeof(struct kt_host));
}

KT_EXPORT void kt_host_free(struct kt_host *h)
{
	if (kt_cur == h)
		kt_cur = NULL;
	free(h);
}

/* fixed: attributes_fixed0, attributes_fixed1, xfam_fixed0, xfam_fixed1,
 * supported_xcr0 | supported_xss, ept_5level, features0. */
KT_EXPORT int kt_host_setup(struct kt_host *h, const u64 *fixed, int n, const u64 *leaves,
			    const u64 *values, int key_first, int key_count, kt_seamcall_fn fn)
{
	struct tdx_sys_info_td_conf *c = &h->sysinfo.td_conf;
	int i;

	if (n < 0 || n > (int)ARRAY_SIZE(c->cpuid_config_leaves) || key_count < 0 ||
	    key_count > KT_MAX_KEYS)
		return -EINVAL;
	c->attributes_fixed0 = fixed[0];
	c->attributes_fixed1 = fixed[1];
	c->xfam_fixed0 = fixed[2];
	c->xfam_fixed1 = fixed[3];
	c->num_cpuid_config = n;
	c->max_vcpus_per_td = 0xFFFF;
	for (i = 0; i < n; i++) {
		c->cpuid_config_leaves[i] = leaves[i];
		c->cpuid_config_values[i][0] = values[2 * i];
		c->cpuid_config_values[i][1] = values[2 * i + 1];
	}
	/* TDCS and TDVPS sizes of the public 1.5 modules (pages are tokens here). */
	h->sysinfo.td_ctrl.tdr_base_size = 0x1000;
	h->sysinfo.td_ctrl.tdcs_base_size = 0x4000;
	h->sysinfo.td_ctrl.tdvps_base_size = 0x5000;
	h->sysinfo.features.tdx_features0 = fixed[6];
	h->supported_xcr0 = fixed[4];
	h->supported_xss = 0;
	h->ept_5level = fixed[5] != 0;
	h->seamcall = fn;
	h->key_first = key_first;
	h->key_count = key_count;
	h->keys_free = key_count;
	return 0;
}

KT_EXPORT struct kt_vm *kt_vm_new(struct kt_host *h)
{
	struct kt_vm *vm;

	kt_enter(h);
	vm = calloc(1, sizeof(*vm));
	if (vm) {
		vm->tdx.kvm.max_vcpus = 1;
		vm->tdx.kvm.arch.default_tsc_khz = 2000000;
		vm->tdx.state = TD_STATE_UNINITIALIZED;
	}
	return vm;
}

KT_EXPORT int kt_vm_ioctl(struct kt_host *h, struct kt_vm *vm, u64 argp)
{
	kt_enter(h);
	/* kvm_vm_ioctl: a VM KVM_BUG_ON marked dead refuses everything. */
	if (vm->tdx.kvm.vm_dead)
		return -EIO;
	return tdx_vm_ioctl(&vm->tdx.kvm, (void *)(uintptr_t)argp);
}

/* kvm_vm_ioctl's first test, for the ioctls kvmtdx answers itself (KVM_CHECK_EXTENSION). */
KT_EXPORT int kt_vm_dead(struct kt_host *h, struct kt_vm *vm)
{
	kt_enter(h);
	return vm->tdx.kvm.vm_dead;
}

KT_EXPORT void kt_vm_free(struct kt_host *h, struct kt_vm *vm)
{
	kt_enter(h);
	/* kvm_destroy_vm: vm_pre_destroy releases the key ID, vm_destroy the pages. */
	tdx_mmu_release_hkid(&vm->tdx.kvm);
	tdx_reclaim_td_control_pages(&vm->tdx.kvm);
	free(vm);
}

/*
 * KVM's TDX bring-up checks on this host and module, where the tree has them
 * (__tdx_hardware_setup: 6.19 on): 0, or why kvm_intel would disable TDX
 * (-ENODEV) or fail to load (any other error).
 */
KT_EXPORT int kt_host_bringup(struct kt_host *h)
{
	kt_enter(h);
#ifdef KT_HAVE___tdx_hardware_setup
	return __tdx_hardware_setup();
#else
	return 0;
#endif
}

/* stats: keys free, live allocations, warnings. */
KT_EXPORT void kt_host_stats(struct kt_host *h, long *out)
{
	out[0] = h->keys_free;
	out[1] = h->allocations;
	out[2] = h->warnings;
}
