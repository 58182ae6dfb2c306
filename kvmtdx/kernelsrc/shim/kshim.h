/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * kvmtdx kernel-source backend: the kernel primitives that code cut out of
 * arch/x86/kvm/vmx/tdx.c and arch/x86/kvm/cpuid.c needs to compile and run
 * in userspace.  Written for kvmtdx from the documented semantics of each
 * primitive; no kernel code here.  Every name this file defines is one the
 * extractor leaves out of the kernel tree, so the shim always wins.
 *
 * What is reduced: locks, guards and lockdep are no-ops (the backend
 * serialises every call); CPU masks see one online package; allocations
 * never fail; user copies read this process's memory after the same range
 * check the kernel's access_ok() makes.  What is modelled: TDX key IDs (a
 * pool per host), the TDX module's SEAMCALLs (kglue.c, into kvmtdx's
 * module model), WARN_ON_ONCE splats and bugged VMs (counted, and a bugged
 * VM refuses further ioctls as KVM does).
 */
#ifndef KVMTDX_KSHIM_H
#define KVMTDX_KSHIM_H

#include <stdbool.h>
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CONFIG_X86_64 1
#define CONFIG_KVM_INTEL_TDX 1
#define CONFIG_INTEL_TDX_HOST 1
#define KBUILD_MODNAME "kvm_intel"

/* Errnos: the x86-64 Linux values. */
#define EPERM 1
#define ENOENT 2
#define EIO 5
#define E2BIG 7
#define EBADF 9
#define EAGAIN 11
#define ENOMEM 12
#define EFAULT 14
#define EBUSY 16
#define ENODEV 19
#define EINVAL 22
#define ENOTTY 25
#define ENOSPC 28
#define ERANGE 34
#define EOPNOTSUPP 95
#define ENOTSUPP 524

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int8_t s8;
typedef int16_t s16;
typedef int32_t s32;
typedef int64_t s64;
typedef u8 __u8;
typedef u16 __u16;
typedef u32 __u32;
typedef u64 __u64;
typedef s8 __s8;
typedef s16 __s16;
typedef s32 __s32;
typedef s64 __s64;
typedef u16 __le16;
typedef u32 __le32;
typedef u64 __le64;
typedef u64 gpa_t;
typedef u64 gfn_t;
typedef u64 hpa_t;
typedef u64 kvm_pfn_t;
typedef u64 phys_addr_t;
typedef struct { int counter; } atomic_t;
#define atomic_read(v) ((v)->counter)
#define atomic_set(v, i) ((v)->counter = (i))
#define atomic_inc(v) ((v)->counter++)
#define atomic_dec(v) ((v)->counter--)
typedef unsigned int gfp_t;

/* Attributes and annotations. */
#define __user
#define __iomem
#define __percpu
#define __rcu
#define __init
#define __exit
#define __initdata
#define __ro_after_init
#define __read_mostly
#define __maybe_unused __attribute__((unused))
#define __always_unused __attribute__((unused))
#undef __always_inline
#define __always_inline inline
#define noinline __attribute__((noinline))
#define __packed __attribute__((packed))
#define __aligned(x) __attribute__((aligned(x)))
#define __must_check
#define __cold
#define __printf(a, b)
#define __acquires(x)
#define __releases(x)
#define __must_hold(x)
#define fallthrough __attribute__((fallthrough))
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile typeof(x) *)&(x) = (v))
#define smp_wmb() __sync_synchronize()
#define smp_rmb() __sync_synchronize()
#define smp_mb() __sync_synchronize()
#define barrier() __asm__ __volatile__("" ::: "memory")
#define module_param_named(a, b, c, d)
#define EXPORT_SYMBOL(x)
#define EXPORT_SYMBOL_GPL(x)
#define EXPORT_SYMBOL_FOR_KVM_INTERNAL(x)

/* Bits, sizes, arithmetic. */
#define BIT(n) (1UL << (n))
#define BIT_ULL(n) (1ULL << (n))
#define GENMASK(h, l) (((~0UL) << (l)) & (~0UL >> (63 - (h))))
#define GENMASK_ULL(h, l) (((~0ULL) << (l)) & (~0ULL >> (63 - (h))))
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))
#define sizeof_field(t, m) sizeof(((t *)0)->m)
#define struct_size(p, member, n) \
	(offsetof(typeof(*(p)), member) + sizeof(((typeof(*(p)) *)0)->member[0]) * (size_t)(n))
#define struct_size_t(t, member, n) \
	(offsetof(t, member) + sizeof(((t *)0)->member[0]) * (size_t)(n))
#define DECLARE_FLEX_ARRAY(type, name) struct { struct { } __empty_##name; type name[]; }
#define __DECLARE_FLEX_ARRAY(type, name) DECLARE_FLEX_ARRAY(type, name)
#define BUILD_BUG_ON(cond) _Static_assert(!(cond), "BUILD_BUG_ON: " #cond)
#define BUILD_BUG_ON_MSG(cond, msg) _Static_assert(!(cond), msg)
#define static_assert(...) _Static_assert(__VA_ARGS__)
#define min(a, b) ((a) < (b) ? (a) : (b))
#define max(a, b) ((a) > (b) ? (a) : (b))
#define min_t(t, a, b) ((t)(a) < (t)(b) ? (t)(a) : (t)(b))
#define max_t(t, a, b) ((t)(a) > (t)(b) ? (t)(a) : (t)(b))
#define U8_MAX ((u8)~0U)
#define U16_MAX ((u16)~0U)
#define U32_MAX ((u32)~0U)
#define U64_MAX ((u64)~0ULL)
#define PAGE_SHIFT 12
#define PAGE_SIZE (1UL << PAGE_SHIFT)
#define __feature_bit(f) ((u32)1 << ((f) & 31))
#define feature_bit(name) __feature_bit(X86_FEATURE_##name)
#define gpa_to_gfn(gpa) ((gfn_t)((gpa) >> PAGE_SHIFT))
#define gfn_to_gpa(gfn) ((gpa_t)(gfn) << PAGE_SHIFT)

/* Printing: nothing is printed; a WARN counts as a splat (kglue.c). */
void kt_warn(const char *where);
#define pr_err(...) ((void)0)
#define pr_warn(...) ((void)0)
#define pr_info(...) ((void)0)
#define pr_debug(...) ((void)0)
#define pr_err_ratelimited(...) ((void)0)
#define pr_warn_ratelimited(...) ((void)0)
#define pr_warn_once(...) ((void)0)
#define pr_err_once(...) ((void)0)
#define WARN_ON(cond) ({ bool __w = !!(cond); if (__w) kt_warn(__func__); __w; })
#define WARN_ON_ONCE(cond) WARN_ON(cond)
#define WARN_ONCE(cond, ...) WARN_ON(cond)
#define WARN(cond, ...) WARN_ON(cond)
#define lockdep_assert_held(x) ((void)0)
#define lockdep_assert_irqs_enabled() ((void)0)
#define lockdep_assert_irqs_disabled() ((void)0)

/* Errors in pointers. */
#define MAX_ERRNO 4095
static inline void *ERR_PTR(long error) { return (void *)error; }
static inline long PTR_ERR(const void *ptr) { return (long)ptr; }
static inline bool IS_ERR(const void *ptr)
{
	return (unsigned long)ptr >= (unsigned long)-MAX_ERRNO;
}

/* Memory: counted, so a leak shows (kt_live_allocations). */
#define GFP_KERNEL 0u
#define GFP_KERNEL_ACCOUNT 0u
#define __GFP_ZERO 0u
void *kzalloc(size_t size, gfp_t flags);
void kfree(const void *p);
#define kmalloc(size, flags) kzalloc(size, flags)
#define kcalloc(n, size, flags) kzalloc((size_t)(n) * (size), flags)
#define kzalloc_obj(T, ...) ((typeof(T) *)kzalloc(sizeof(typeof(T)), 0))
#define kzalloc_objs(T, n, ...) ((typeof(T) *)kzalloc(sizeof(typeof(T)) * (size_t)(n), 0))
#define kzalloc_flex(T, member, n, ...) \
	((typeof(T) *)kzalloc(struct_size_t(typeof(T), member, n), 0))
#define kvfree(p) kfree(p)
#define kvzalloc(size, flags) kzalloc(size, flags)
static inline void *memchr_inv(const void *start, int c, size_t bytes)
{
	const unsigned char *p = start;
	size_t i;

	for (i = 0; i < bytes; i++)
		if (p[i] != (unsigned char)c)
			return (void *)(p + i);
	return NULL;
}

/* User memory: this process's, behind the kernel's address range check. */
#define u64_to_user_ptr(x) ((void *)(uintptr_t)(x))
bool kt_access_ok(const void *addr, size_t size);
static inline unsigned long copy_from_user(void *to, const void *from, unsigned long n)
{
	if (!kt_access_ok(from, n))
		return n;
	memcpy(to, from, n);
	return 0;
}
static inline unsigned long copy_to_user(void *to, const void *from, unsigned long n)
{
	if (!kt_access_ok(to, n))
		return n;
	memcpy(to, from, n);
	return 0;
}
#define get_user(x, ptr) ({							\
	int __gu = -EFAULT;							\
	if (kt_access_ok((ptr), sizeof(*(ptr)))) {				\
		(x) = *(ptr);							\
		__gu = 0;							\
	}									\
	__gu;									\
})
#define put_user(x, ptr) ({							\
	int __pu = -EFAULT;							\
	if (kt_access_ok((ptr), sizeof(*(ptr)))) {				\
		*(ptr) = (x);							\
		__pu = 0;							\
	}									\
	__pu;									\
})
static inline void *memdup_user(const void *src, size_t len)
{
	void *p = kzalloc(len, 0);

	if (copy_from_user(p, src, len)) {
		kfree(p);
		return ERR_PTR(-EFAULT);
	}
	return p;
}

/* Locks and guards: the backend serialises every call. */
struct mutex { int unused; };
#define DEFINE_MUTEX(name) struct mutex name
#define mutex_init(m) ((void)(m))
#define mutex_lock(m) ((void)(m))
#define mutex_unlock(m) ((void)(m))
#define mutex_lock_killable(m) ((void)(m), 0)
#define cpus_read_lock() ((void)0)
#define cpus_read_unlock() ((void)0)
#define DEFINE_CLASS(_name, _type, _exit, _init, _init_args...)		\
typedef _type class_##_name##_t;					\
static inline void class_##_name##_destructor(_type *p)		\
{ _type _T = *p; _exit; }						\
static inline _type class_##_name##_constructor(_init_args)		\
{ _type t = _init; return t; }
#define CLASS(_name, var)						\
	class_##_name##_t var						\
	__attribute__((cleanup(class_##_name##_destructor))) =		\
		class_##_name##_constructor
#define guard(_name) ((void)0);
#define scoped_guard(_name, ...) for (int __sg = 1; __sg; __sg = 0)

/* CPUs: one online CPU in one package. */
typedef struct { unsigned long bits; } cpumask_var_t[1];
#define for_each_present_cpu(cpu) for ((cpu) = 0; (cpu) < 1; (cpu)++)
#define for_each_online_cpu(cpu) for ((cpu) = 0; (cpu) < 1; (cpu)++)
#define for_each_possible_cpu(cpu) for ((cpu) = 0; (cpu) < 1; (cpu)++)
#define topology_physical_package_id(cpu) 0
#define num_present_cpus() 1
#define num_online_cpus() 1
static inline bool zalloc_cpumask_var(cpumask_var_t *m, gfp_t f)
{
	(*m)->bits = 0;
	return true;
}
#define free_cpumask_var(m) ((void)(m))
#define cpumask_set_cpu(cpu, m) ((m)->bits |= 1UL << (cpu))
#define cpumask_clear_cpu(cpu, m) ((m)->bits &= ~(1UL << (cpu)))
#define cpumask_empty(m) ((m)->bits == 0)
static inline bool kt_test_and_set(unsigned long *bits, int cpu)
{
	bool was = *bits & (1UL << cpu);

	*bits |= 1UL << cpu;
	return was;
}
#define cpumask_test_and_set_cpu(cpu, m) kt_test_and_set(&(m)->bits, (cpu))
#define smp_call_on_cpu(cpu, fn, arg, phys) ((fn)(arg))

/* Pages: tokens, never touched; __pa gives the address a SEAMCALL reads. */
struct page { u64 token; };
struct page *alloc_page(gfp_t flags);
void __free_page(struct page *page);
#define __pa(x) ((u64)(uintptr_t)(x))
#define page_to_phys(p) ((u64)(uintptr_t)(p))

/* Control groups: always charged. */
struct misc_cg { int unused; };
#define MISC_CG_RES_TDX 0
#define get_current_misc_cg() ((struct misc_cg *)NULL)
#define misc_cg_try_charge(res, cg, n) 0
#define misc_cg_uncharge(res, cg, n) ((void)0)
#define put_misc_cg(cg) ((void)0)
#define misc_cg_set_capacity(res, n) 0

/* KVM: the VM as far as the TDX ioctls read it. */
struct kvm_arch {
	u64 gfn_direct_bits;
	u32 default_tsc_khz;
	bool pre_fault_allowed;
	bool has_private_mem;
	bool has_protected_state;
};
struct kvm {
	struct kvm_arch arch;
	int created_vcpus;
	atomic_t online_vcpus;
	int max_vcpus;
	bool vm_bugged;
	bool vm_dead;
	struct mutex lock;
	struct mutex slots_lock;
};
struct kvm_vcpu { struct kvm *kvm; };
struct kvm_caps {
	u64 supported_xcr0;
	u64 supported_xss;
};
extern struct kvm_caps kvm_caps;
void kvm_vm_bugged(struct kvm *kvm);
#define KVM_BUG_ON(cond, kvm) ({						\
	bool __b = !!(cond);							\
	if (WARN_ON_ONCE(__b && !(kvm)->vm_bugged))				\
		kvm_vm_bugged(kvm);						\
	__b;									\
})
#define kvm_lock_all_vcpus(kvm) 0
#define kvm_unlock_all_vcpus(kvm) ((void)0)
bool cpu_has_vmx_ept_5levels(void);

/* The TDX module and the key IDs, answered by kglue.c. */
struct tdx_td;
int tdx_guest_keyid_alloc(void);
void tdx_guest_keyid_free(unsigned int keyid);
u32 tdx_get_nr_guest_keyids(void);
u64 tdh_mng_create(struct tdx_td *td, u16 hkid);
u64 tdh_mng_key_config(struct tdx_td *td);
u64 tdh_mng_addcx(struct tdx_td *td, struct page *tdcs_page);
u64 tdh_mng_init(struct tdx_td *td, u64 td_params, u64 *extended_err);
u64 tdh_mng_rd(struct tdx_td *td, u64 field, u64 *data);
u64 tdh_mr_finalize(struct tdx_td *td);

/* Bring-up (__tdx_hardware_setup): every user-return MSR has a slot. */
struct tdx_sys_info;
const struct tdx_sys_info *tdx_get_sysinfo(void);
int kvm_find_user_return_msr(u32 msr);

/*
 * Teardown (what vm_destroy and the INIT_VM error path call): releasing the
 * key ID and the control pages, without the cache flushes and reclaim
 * SEAMCALLs that have nothing to say about CPUID.
 */
void tdx_mmu_release_hkid(struct kvm *kvm);
void tdx_reclaim_td_control_pages(struct kvm *kvm);

#endif
