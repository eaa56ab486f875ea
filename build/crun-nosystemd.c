/*
 * libsystemd.so.0 for crun in the guest: the 19 functions crun imports, none of which can
 * do anything there. The guest has no systemd and the agent runs crun with cgroupfs, so
 * crun never reaches sd_bus_*; sd_notify* report "no notify socket" (0), the journal
 * "not supported". Debian's libsystemd would instead bring libgcrypt, libgpg-error,
 * liblzma, libzstd and liblz4: 3.4 MiB of initrd, and ~3,800 relocations that every crun
 * call (create, start, exec, kill, delete) pays again under TCG.
 * Built by build/guest.mk with crun-nosystemd.map (crun binds these symbol versions).
 */
#include <errno.h>
#include <stddef.h>

#define NOT_HERE(name) int name(void) { return -ENOSYS; }

NOT_HERE(sd_bus_call)
NOT_HERE(sd_bus_default_system)
NOT_HERE(sd_bus_default_user)
NOT_HERE(sd_bus_error_get_errno)
NOT_HERE(sd_bus_match_signal_async)
NOT_HERE(sd_bus_message_append)
NOT_HERE(sd_bus_message_append_strv)
NOT_HERE(sd_bus_message_close_container)
NOT_HERE(sd_bus_message_new_method_call)
NOT_HERE(sd_bus_message_open_container)
NOT_HERE(sd_bus_message_read)
NOT_HERE(sd_bus_process)
NOT_HERE(sd_bus_wait)
NOT_HERE(sd_journal_send_with_location)

int sd_notify(int unset_environment, const char *state)
{
    (void)unset_environment;
    (void)state;
    return 0;
}

int sd_notify_barrier(int unset_environment, unsigned long long timeout)
{
    (void)unset_environment;
    (void)timeout;
    return 0;
}

void sd_bus_error_free(void *error) { (void)error; }
void *sd_bus_message_unref(void *message) { (void)message; return NULL; }
void *sd_bus_unref(void *bus) { (void)bus; return NULL; }
