/* The guest's /init when its files come from the shared read-only root image
 * (`image` in [hypervisor.qemu], build/README.md "Shared root image").
 *
 * It loads the drivers the image needs (the paths in /loader.modules, dependencies
 * first), waits for /dev/pmem0, mounts it read-only with DAX (the guest reads the host's
 * page cache of the image: no copy in guest RAM), frees its own files, moves the mount
 * over / and execs the image's /init, which starts the agent. Static and tiny because
 * every exec and every page costs ~20x under TCG: busybox insmods here cost 0.2 s.
 * Any failure is fatal: the message goes to the console and the VM resets, which QEMU
 * (-no-reboot) takes as its exit, so the message is among the console's last lines, which
 * the shim's error quotes (a PID 1 that exits would bury it under the kernel's panic
 * report; ACPI power-off is not there this early).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MODULES_FILE "/loader.modules"
#define DEVICE "/dev/pmem0"
#define TARGET "/newroot"
#define WAIT_MS 20000 /* a loaded TCG host may take seconds to probe the device */

static void die(const char *what, const char *arg)
{
	fprintf(stderr, "kata-loader: %s %s: %s\n", what, arg, strerror(errno));
	reboot(RB_AUTOBOOT);
	exit(1); /* only if the reset failed: the kernel panics instead */
}

/* Load each module listed (one path per line), then remove its file: the initramfs
 * cannot be freed, its files can. A module already there (EEXIST) is fine. */
static void load_modules(void)
{
	static char list[8192];
	int fd = open(MODULES_FILE, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die("cannot open", MODULES_FILE);
	ssize_t n = read(fd, list, sizeof(list) - 1);
	if (n < 0)
		die("cannot read", MODULES_FILE);
	close(fd);
	list[n] = '\0';
	for (char *path = strtok(list, "\n"); path; path = strtok(NULL, "\n")) {
		int mod = open(path, O_RDONLY | O_CLOEXEC);
		if (mod < 0)
			die("cannot open module", path);
		if (syscall(SYS_finit_module, mod, "", 0) != 0 && errno != EEXIST)
			die("cannot load module", path);
		close(mod);
		unlink(path);
	}
	unlink(MODULES_FILE);
}

/* Mount the image once its device can be opened. devtmpfs makes the node while the disk
 * is being added, a moment before it can be opened: ENXIO meanwhile (seen with 8 VMs
 * booting at once on 2 cores), ENOENT before. Both are waited out; any other error (an
 * image without a filesystem: EINVAL) is fatal at once. */
static void mount_image(void)
{
	struct timespec tick = {0, 5 * 1000 * 1000};
	for (int waited = 0;; waited += 5) {
		if (mount(DEVICE, TARGET, "ext4", MS_RDONLY | MS_NODEV, "dax=always") == 0)
			return;
		if (errno != ENOENT && errno != ENXIO)
			die("cannot mount", DEVICE);
		if (waited >= WAIT_MS) {
			if (errno == ENOENT) {
				errno = ETIMEDOUT;
				die("no device", DEVICE " (is the VM given the image as virtio-pmem?)");
			}
			die("cannot mount", DEVICE);
		}
		nanosleep(&tick, NULL);
	}
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") != 0)
		die("cannot mount", "/dev");
	load_modules();
	mount_image();
	if (umount2("/dev", MNT_DETACH) != 0)
		die("cannot unmount", "/dev");
	unlink("/init");
	if (chdir(TARGET) != 0)
		die("cannot enter", TARGET);
	if (mount(".", "/", NULL, MS_MOVE, NULL) != 0)
		die("cannot move", TARGET " to /");
	if (chroot(".") != 0 || chdir("/") != 0)
		die("cannot enter", "the image");
	/* stage2: the image's /init skips making the root pivotable; a mount already is. */
	char *init_argv[] = {"/init", "stage2", NULL};
	execv("/init", init_argv);
	die("cannot exec", "/init of the image");
	return 1;
}
