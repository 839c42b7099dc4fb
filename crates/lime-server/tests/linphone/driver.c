/*
 * linphone-driver: the core part (see driver.h for the interface). Prints every
 * callback the core gives as a JSON line, and runs one command.
 *
 * Commands here:
 *   register [LINGER]  until the LIME user is created or updated on the key
 *                      server (or that failed), then LINGER more seconds
 *                      (default 0) to show what the client does next.
 *   update             until a LIME operation other than a creation ends (the
 *                      keys update liblinphone starts on registering when
 *                      [lime] last_update_time is older than
 *                      lime_update_threshold).
 *   run                iterates for the whole time, whatever happens.
 */
#include "driver.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_COMMANDS 32
static struct {
	const char *name;
	DriverCommand command;
} commands[MAX_COMMANDS];
static int command_count;

void driver_register_command(const char *name, DriverCommand command) {
	if (command_count == MAX_COMMANDS) {
		fprintf(stderr, "linphone-driver: more than %d commands\n", MAX_COMMANDS);
		exit(2);
	}
	commands[command_count].name = name;
	commands[command_count].command = command;
	command_count++;
}

double device_now(void) {
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

const char *json_quote(int slot, const char *text) {
	static char *buffers[8];
	if (slot < 0 || slot > 7) slot = 0;
	free(buffers[slot]);
	if (!text) return buffers[slot] = strdup("null");
	size_t length = strlen(text);
	char *out = malloc(length * 6 + 3), *p = out;
	*p++ = '"';
	for (const unsigned char *c = (const unsigned char *)text; *c; c++) {
		if (*c == '"' || *c == '\\') {
			*p++ = '\\';
			*p++ = (char)*c;
		} else if (*c < 0x20) {
			p += sprintf(p, "\\u%04x", *c);
		} else {
			*p++ = (char)*c;
		}
	}
	*p++ = '"';
	*p = 0;
	return buffers[slot] = out;
}

void emit(const char *event, const char *fields_format, ...) {
	printf("{\"event\":%s", json_quote(7, event));
	if (fields_format) {
		va_list arguments;
		va_start(arguments, fields_format);
		putchar(',');
		vprintf(fields_format, arguments);
		va_end(arguments);
	}
	printf("}\n");
	/* The harness reads the lines as they come, and a killed driver loses
	 * nothing. */
	fflush(stdout);
}

bool device_iterate_until(Device *device, DevicePredicate done, void *state, double seconds) {
	double end = device->deadline;
	if (seconds > 0 && device_now() + seconds < end) end = device_now() + seconds;
	while (device_now() < end) {
		linphone_core_iterate(device->core);
		if (done && done(device, state)) return true;
		usleep(20000);
	}
	return false;
}

/* --- Callbacks: every one is reported. --- */

static Device *device_of(LinphoneCore *core) {
	return (Device *)linphone_core_get_user_data(core);
}

static void on_account_registration(LinphoneCore *core,
                                    LinphoneAccount *account,
                                    LinphoneRegistrationState state,
                                    const char *message) {
	(void)account;
	device_of(core)->registration = state;
	emit("registration", "\"state\":%s,\"message\":%s",
	     json_quote(0, linphone_registration_state_to_string(state)), json_quote(1, message));
}

static void on_imee_user_registration(LinphoneCore *core, const bool_t status, const char *user_id, const char *info) {
	Device *device = device_of(core);
	if (status)
		device->lime_ok++;
	else
		device->lime_failed++;
	emit("lime_user", "\"ok\":%s,\"user\":%s,\"info\":%s", status ? "true" : "false", json_quote(0, user_id),
	     json_quote(1, info));
}

static void on_authentication_requested(LinphoneCore *core, LinphoneAuthInfo *info, LinphoneAuthMethod method) {
	device_of(core)->auth_requested++;
	emit("auth_requested", "\"method\":%s,\"username\":%s,\"realm\":%s,\"domain\":%s",
	     method == LinphoneAuthHttpDigest ? "\"digest\"" : "\"tls\"", json_quote(0, linphone_auth_info_get_username(info)),
	     json_quote(1, linphone_auth_info_get_realm(info)), json_quote(2, linphone_auth_info_get_domain(info)));
}

static void on_global_state(LinphoneCore *core, LinphoneGlobalState state, const char *message) {
	(void)core;
	emit("global_state", "\"state\":%s,\"message\":%s", json_quote(0, linphone_global_state_to_string(state)),
	     json_quote(1, message));
}

/* The device the log callback counts for (one a process). */
static Device *the_device;

/* liblinphone's own log, to stderr (which the harness keeps in a file). The
 * outcome of a LIME operation other than a user's creation (the keys update)
 * has no callback in 5.1, only this log line of the encryption engine:
 * "[LIME] operation successful: Keys update" (or "operation failed: ..."). */
static void on_log(LinphoneLoggingService *service, const char *domain, LinphoneLogLevel level, const char *message) {
	(void)service;
	(void)level;
	fprintf(stderr, "[%s] %s\n", domain ? domain : "", message);
	static const char ok[] = "[LIME] operation successful: ", failed[] = "[LIME] operation failed: ";
	if (strncmp(message, ok, sizeof ok - 1) == 0) {
		if (the_device) the_device->lime_operations_ok++;
		emit("lime_operation", "\"ok\":true,\"operation\":%s", json_quote(6, message + sizeof ok - 1));
	} else if (strncmp(message, failed, sizeof failed - 1) == 0) {
		if (the_device) the_device->lime_operations_failed++;
		emit("lime_operation", "\"ok\":false,\"operation\":%s", json_quote(6, message + sizeof failed - 1));
	}
}

/* --- The core's commands. --- */

static bool lime_answered(Device *device, void *state) {
	(void)state;
	return device->lime_ok + device->lime_failed > 0;
}

static int command_register(Device *device, int argc, char **argv) {
	double linger = argc > 0 ? atof(argv[0]) : 0;
	double start = device_now();
	bool reached = device_iterate_until(device, lime_answered, NULL, 0);
	emit("done", "\"command\":\"register\",\"reached\":%s,\"seconds\":%.2f", reached ? "true" : "false",
	     device_now() - start);
	if (linger > 0) device_iterate_until(device, NULL, NULL, linger);
	return 0;
}
DRIVER_COMMAND("register", command_register)

static bool keys_updated(Device *device, void *state) {
	(void)state;
	return device->lime_operations_ok + device->lime_operations_failed > 0;
}

static int command_update(Device *device, int argc, char **argv) {
	(void)argc;
	(void)argv;
	double start = device_now();
	bool reached = device_iterate_until(device, keys_updated, NULL, 0);
	emit("done", "\"command\":\"update\",\"reached\":%s,\"seconds\":%.2f", reached ? "true" : "false",
	     device_now() - start);
	return 0;
}
DRIVER_COMMAND("update", command_update)

static int command_run(Device *device, int argc, char **argv) {
	(void)argc;
	(void)argv;
	device_iterate_until(device, NULL, NULL, 0);
	emit("done", "\"command\":\"run\",\"reached\":true");
	return 0;
}
DRIVER_COMMAND("run", command_run)

/* liblinphone's own log, to stderr (which the harness keeps in a file). */
int main(int argc, char **argv) {
	if (argc < 4) {
		fprintf(stderr, "usage: %s COMMAND CONFIG SECONDS [ARGUMENTS...]\n", argv[0]);
		return 2;
	}
	DriverCommand command = NULL;
	for (int i = 0; i < command_count; i++)
		if (strcmp(commands[i].name, argv[1]) == 0) command = commands[i].command;
	if (!command) {
		fprintf(stderr, "linphone-driver: no command %s\n", argv[1]);
		return 2;
	}
	double seconds = atof(argv[3]);
	if (seconds <= 0) {
		fprintf(stderr, "linphone-driver: SECONDS must be positive, not %s\n", argv[3]);
		return 2;
	}

	LinphoneLoggingService *logging = linphone_logging_service_get();
	LinphoneLoggingServiceCbs *log_cbs = linphone_factory_create_logging_service_cbs(linphone_factory_get());
	linphone_logging_service_cbs_set_log_message_written(log_cbs, on_log);
	linphone_logging_service_add_callbacks(logging, log_cbs);
	linphone_logging_service_cbs_unref(log_cbs);
	linphone_logging_service_set_log_level(logging, getenv("LINPHONE_DRIVER_DEBUG") ? LinphoneLogLevelDebug
	                                                                                : LinphoneLogLevelMessage);

	Device device = {0};
	the_device = &device;
	device.deadline = device_now() + seconds;
	LinphoneFactory *factory = linphone_factory_get();
	device.core = linphone_factory_create_core_3(factory, argv[2], NULL, NULL);
	if (!device.core) {
		emit("error", "\"message\":%s", json_quote(0, "the core could not be created from the config"));
		return 1;
	}
	linphone_core_set_user_data(device.core, &device);
	LinphoneCoreCbs *cbs = linphone_factory_create_core_cbs(factory);
	linphone_core_cbs_set_account_registration_state_changed(cbs, on_account_registration);
	linphone_core_cbs_set_imee_user_registration(cbs, on_imee_user_registration);
	linphone_core_cbs_set_authentication_requested(cbs, on_authentication_requested);
	linphone_core_cbs_set_global_state_changed(cbs, on_global_state);
	linphone_core_add_callbacks(device.core, cbs);
	linphone_core_cbs_unref(cbs);

	if (linphone_core_start(device.core) != 0) {
		emit("error", "\"message\":%s", json_quote(0, "the core did not start"));
		return 1;
	}
	/* As the Linphone apps do at start: LIME on, with the [lime] section's
	 * lime_server_url (without one, it stays off and no user is made). */
	linphone_core_enable_lime_x3dh(device.core, TRUE);
	if (!linphone_core_lime_x3dh_enabled(device.core))
		emit("error", "\"message\":%s", json_quote(0, "LIME X3DH is not enabled (no [lime] lime_server_url?)"));
	int status = command(&device, argc - 4, argv + 4);
	/* Stopping writes the config back (what the client learnt: the HA1 and its
	 * algorithm once a challenge was answered, the LIME update time). */
	linphone_core_stop(device.core);
	linphone_core_unref(device.core);
	emit("stopped", NULL);
	return status;
}
