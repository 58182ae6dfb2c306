/*
 * The KVM TDX uapi structs kvmtdx speaks, declared for cffi's ABI mode.
 * Layouts follow include/uapi/asm-x86/kvm.h of Linux 6.16 and later; the test
 * suite compiles the real header and compares every size and offset with
 * what cffi derives from this file, so this file stays the single source.
 * Callers reach the entries past a header through the nested flexible
 * array, so buffers are allocated as bytes and cast to these types.
 */

struct kvm_cpuid_entry2 {
	uint32_t function;
	uint32_t index;
	uint32_t flags;
	uint32_t eax;
	uint32_t ebx;
	uint32_t ecx;
	uint32_t edx;
	uint32_t padding[3];
};

struct kvm_cpuid2 {
	uint32_t nent;
	uint32_t padding;
	struct kvm_cpuid_entry2 entries[];
};

struct kvm_tdx_cmd {
	uint32_t id;
	uint32_t flags;
	uint64_t data;
	uint64_t hw_error;
};

struct kvm_tdx_capabilities {
	uint64_t supported_attrs;
	uint64_t supported_xfam;
	uint64_t kernel_tdvmcallinfo_1_r11;
	uint64_t user_tdvmcallinfo_1_r11;
	uint64_t kernel_tdvmcallinfo_1_r12;
	uint64_t user_tdvmcallinfo_1_r12;
	uint64_t reserved[250];
	struct kvm_cpuid2 cpuid;
};

struct kvm_tdx_init_vm {
	uint64_t attributes;
	uint64_t xfam;
	uint64_t mrconfigid[6];
	uint64_t mrowner[6];
	uint64_t mrownerconfig[6];
	uint64_t reserved[12];
	struct kvm_cpuid2 cpuid;
};

struct kvm_enable_cap {
	uint32_t cap;
	uint32_t flags;
	uint64_t args[4];
	uint8_t pad[64];
};

int open(const char *pathname, int flags, ...);
int ioctl(int fd, unsigned long request, ...);
int close(int fd);
