/*
 * linphone-driver: runs one Linphone device (a LinphoneCore of liblinphone, the
 * library of the Linphone apps) for a test, and reports what happened as JSON
 * lines on stdout.
 *
 * The test harness (tests/common/linphone.rs) compiles every *.c file of this
 * directory into one program, with `pkg-config linphone`:
 *
 *     linphone-driver COMMAND CONFIG SECONDS [ARGUMENTS...]
 *
 * CONFIG is a linphonerc the harness wrote (the account, its auth info, the
 * root CA, [lime] lime_server_url...: everything a device is, as the apps store
 * it), SECONDS bounds the whole run: the driver exits (status 0) once its
 * command is done, or when the time is up (the last line then says so).
 *
 * Output: one JSON object a line, each with an "event" key, e.g.
 *     {"event":"registration","state":"Ok","message":"Registration successful"}
 *     {"event":"lime_user","ok":true,"user":"sip:alice@...;gr=...","info":""}
 *     {"event":"auth_requested","username":"alice","realm":"example.org"}
 *     {"event":"lime_operation","ok":true,"operation":"Keys update"}
 *     {"event":"done","command":"register","reached":true,"seconds":1.2}
 * Every callback the core gives is printed as it comes, whatever the command.
 *
 * Adding a command without editing driver.c: in a file of its own (say
 * driver_chat.c), write the function and register it with DRIVER_COMMAND:
 *
 *     #include "driver.h"
 *     static int chat_send(Device *device, int argc, char **argv) {
 *         ... device_iterate_until(device, my_predicate, my_state) ...
 *         return 0;  // the exit status
 *     }
 *     DRIVER_COMMAND("chat-send", chat_send)
 *
 * A command gets the device already started (its core iterating has not begun),
 * and the arguments after SECONDS. Extra core callbacks: add a LinphoneCoreCbs of
 * your own with linphone_core_add_callbacks(device->core, ...).
 */
#ifndef LIME_TEST_LINPHONE_DRIVER_H
#define LIME_TEST_LINPHONE_DRIVER_H

#include <linphone/core.h>
#include <stdbool.h>

/* One device: a started core and what it has told us so far. */
typedef struct Device {
	LinphoneCore *core;
	/* When the run must end (monotonic seconds, see device_now()). */
	double deadline;
	/* Registration: the last state of the default account. */
	LinphoneRegistrationState registration;
	/* LIME: how many user registrations succeeded, and failed (the
	 * imee_user_registration callback: a LIME user created or updated on the
	 * key server, or the attempt failed). */
	int lime_ok;
	int lime_failed;
	/* LIME operations other than a user's creation (the keys update: "Keys
	 * update"), which 5.1 reports only in its log: how many succeeded, failed. */
	int lime_operations_ok;
	int lime_operations_failed;
	/* How many times the core asked for credentials it did not have. */
	int auth_requested;
} Device;

/* A predicate on a device, for device_iterate_until(). */
typedef bool (*DevicePredicate)(Device *device, void *state);

/* Iterates the core (every 20 ms) until `done` holds or the device's deadline
 * (or `seconds` from now, if sooner and positive) passes. Returns whether `done`
 * held. A NULL `done` iterates for the whole time. */
bool device_iterate_until(Device *device, DevicePredicate done, void *state, double seconds);

/* Monotonic time in seconds. */
double device_now(void);

/* Prints one JSON line: {"event":EVENT,<fields>} where `fields_format` is a
 * printf format producing the rest of the members (may be NULL), e.g.
 * emit("sent", "\"id\":%d", 3). Strings inside must go through json_quote(). */
void emit(const char *event, const char *fields_format, ...);

/* A JSON string literal (quotes included) for `text` (NULL gives null), valid
 * until the next call with the same `slot` (0..7): several can be in one emit. */
const char *json_quote(int slot, const char *text);

/* A command: returns the process exit status. */
typedef int (*DriverCommand)(Device *device, int argc, char **argv);

/* Registers a command under `name` (called from a constructor, see below). */
void driver_register_command(const char *name, DriverCommand command);

#define DRIVER_COMMAND(name, function)                                                       \
	__attribute__((constructor)) static void register_##function(void) {                     \
		driver_register_command(name, function);                                             \
	}

#endif
