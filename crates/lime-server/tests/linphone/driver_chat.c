/*
 * linphone-driver: the chat commands (see driver.h for the interface). One
 * device talks to another in a one-to-one chat room with LIME encryption, as the
 * Linphone apps make them: backend FlexisipChat (a conference focus holds the
 * room, see focus.py), encryption backend LIME (the keys come from the key
 * server named by [lime] lime_server_url), group disabled.
 *
 *   chat-send PEER TEXT   once the device's LIME user is on the key server,
 *                         creates the room with PEER (needs the account's
 *                         conference_factory_uri), waits until the focus told it
 *                         the devices (the first NOTIFY), sends TEXT, and waits
 *                         for TEXT to be delivered and for one answer.
 *   chat-answer TEXT      waits for one message, then answers TEXT in its room
 *                         and waits for the answer to be delivered.
 *
 * Events (besides the core's, see driver.c):
 *   {"event":"chat_room","state":"Created","peer":...,"local":...}
 *   {"event":"chat_room_joined","peer":...,"participants":N}
 *   {"event":"message_received","text":...,"from":...,"secured":true,...}
 *   {"event":"message_undecryptable","from":...}
 *   {"event":"message_state","state":"Delivered","text":...}
 * "text" of message_received is what liblinphone decrypted: the tests compare it
 * with what the other device sent.
 */
#include "driver.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* What the chat callbacks saw. One device per process, so one of these. */
static struct {
	LinphoneChatRoom *room;   /* the room of this run: created, or the first one seen */
	bool joined;              /* the room got its first NOTIFY (participants, devices) */
	int received;             /* messages received and decrypted */
	int undecryptable;        /* messages liblinphone could not decrypt */
	LinphoneChatMessage *sent; /* the last message sent, kept: its callbacks live with it */
	LinphoneChatMessageState sent_state;
} chat;

static const char *address_text(int slot, const LinphoneAddress *address) {
	char *text = address ? linphone_address_as_string(address) : NULL;
	const char *quoted = json_quote(slot, text);
	bctbx_free(text);
	return quoted;
}

static void on_conference_joined(LinphoneChatRoom *room, const LinphoneEventLog *event) {
	(void)event;
	if (room != chat.room) return;
	chat.joined = true;
	bctbx_list_t *participants = linphone_chat_room_get_participants(room);
	emit("chat_room_joined", "\"peer\":%s,\"participants\":%d",
	     address_text(0, linphone_chat_room_get_peer_address(room)), (int)bctbx_list_size(participants));
	bctbx_list_free_with_data(participants, (bctbx_list_free_func)linphone_participant_unref);
}

/* Follows `room` as the room of this run (its joining, its state). */
static void follow_room(LinphoneChatRoom *room) {
	if (chat.room) return;
	chat.room = linphone_chat_room_ref(room);
	LinphoneChatRoomCbs *cbs = linphone_factory_create_chat_room_cbs(linphone_factory_get());
	linphone_chat_room_cbs_set_conference_joined(cbs, on_conference_joined);
	linphone_chat_room_add_callbacks(room, cbs);
	linphone_chat_room_cbs_unref(cbs);
}

static void on_chat_room_state(LinphoneCore *core, LinphoneChatRoom *room, LinphoneChatRoomState state) {
	(void)core;
	emit("chat_room", "\"state\":%s,\"peer\":%s,\"local\":%s", json_quote(0, linphone_chat_room_state_to_string(state)),
	     address_text(1, linphone_chat_room_get_peer_address(room)),
	     address_text(2, linphone_chat_room_get_local_address(room)));
	/* The answering side learns of its room here: the focus INVITEd it. */
	follow_room(room);
}

static void on_message_received(LinphoneCore *core, LinphoneChatRoom *room, LinphoneChatMessage *message) {
	(void)core;
	if (linphone_chat_message_is_outgoing(message)) return;
	follow_room(room);
	chat.received++;
	emit("message_received", "\"text\":%s,\"from\":%s,\"peer\":%s,\"content_type\":%s,\"secured\":%s",
	     json_quote(0, linphone_chat_message_get_utf8_text(message)),
	     address_text(1, linphone_chat_message_get_from_address(message)),
	     address_text(2, linphone_chat_room_get_peer_address(room)),
	     json_quote(3, linphone_chat_message_get_content_type(message)),
	     linphone_chat_message_is_secured(message) ? "true" : "false");
}

static void on_message_undecryptable(LinphoneCore *core, LinphoneChatRoom *room, LinphoneChatMessage *message) {
	(void)core;
	(void)room;
	chat.undecryptable++;
	emit("message_undecryptable", "\"from\":%s", address_text(0, linphone_chat_message_get_from_address(message)));
}

static void on_message_state(LinphoneChatMessage *message, LinphoneChatMessageState state) {
	chat.sent_state = state;
	emit("message_state", "\"state\":%s,\"text\":%s", json_quote(0, linphone_chat_message_state_to_string(state)),
	     json_quote(1, linphone_chat_message_get_utf8_text(message)));
}

static void add_chat_callbacks(Device *device) {
	LinphoneCoreCbs *cbs = linphone_factory_create_core_cbs(linphone_factory_get());
	linphone_core_cbs_set_chat_room_state_changed(cbs, on_chat_room_state);
	linphone_core_cbs_set_message_received(cbs, on_message_received);
	linphone_core_cbs_set_message_received_unable_decrypt(cbs, on_message_undecryptable);
	linphone_core_add_callbacks(device->core, cbs);
	linphone_core_cbs_unref(cbs);
}

/* Sends `text` in the room of this run, watching its state. */
static void send_text(const char *text) {
	LinphoneChatMessage *message = linphone_chat_room_create_message_from_utf8(chat.room, text);
	LinphoneChatMessageCbs *cbs = linphone_factory_create_chat_message_cbs(linphone_factory_get());
	linphone_chat_message_cbs_set_msg_state_changed(cbs, on_message_state);
	linphone_chat_message_add_callbacks(message, cbs);
	linphone_chat_message_cbs_unref(cbs);
	if (chat.sent) linphone_chat_message_unref(chat.sent);
	chat.sent = message;
	chat.sent_state = LinphoneChatMessageStateIdle;
	linphone_chat_message_send(message);
}

/* --- predicates --- */

static bool lime_user_ready(Device *device, void *state) {
	(void)state;
	return device->lime_failed > 0 || (device->lime_ok > 0 && device->registration == LinphoneRegistrationOk);
}

static bool room_joined(Device *device, void *state) {
	(void)device;
	(void)state;
	return chat.joined || (chat.room && linphone_chat_room_get_state(chat.room) == LinphoneChatRoomStateCreationFailed);
}

static bool sent_settled(Device *device, void *state) {
	(void)device;
	(void)state;
	return chat.sent_state == LinphoneChatMessageStateDelivered ||
	       chat.sent_state == LinphoneChatMessageStateDeliveredToUser ||
	       chat.sent_state == LinphoneChatMessageStateDisplayed ||
	       chat.sent_state == LinphoneChatMessageStateNotDelivered;
}

static bool sent_delivered(void) {
	return sent_settled(NULL, NULL) && chat.sent_state != LinphoneChatMessageStateNotDelivered;
}

static bool message_came(Device *device, void *state) {
	(void)device;
	(void)state;
	return chat.received > 0 || chat.undecryptable > 0;
}

/* Reports how far the command went, and lets go of what it held before the
 * core stops. */
static int finish(const char *command, const char *step, double start) {
	if (chat.sent) linphone_chat_message_unref(chat.sent);
	if (chat.room) linphone_chat_room_unref(chat.room);
	chat.sent = NULL;
	chat.room = NULL;
	emit("done", "\"command\":%s,\"reached\":%s,\"step\":%s,\"seconds\":%.2f", json_quote(0, command),
	     strcmp(step, "all") == 0 ? "true" : "false", json_quote(1, step), device_now() - start);
	return 0;
}

/* --- commands --- */

static int command_chat_send(Device *device, int argc, char **argv) {
	double start = device_now();
	if (argc < 2) {
		fprintf(stderr, "chat-send PEER TEXT\n");
		return 2;
	}
	add_chat_callbacks(device);
	if (!device_iterate_until(device, lime_user_ready, NULL, 0) || device->lime_ok == 0)
		return finish("chat-send", "lime_user", start);

	LinphoneCore *core = device->core;
	LinphoneChatRoomParams *params = linphone_core_create_default_chat_room_params(core);
	linphone_chat_room_params_set_backend(params, LinphoneChatRoomBackendFlexisipChat);
	linphone_chat_room_params_set_encryption_backend(params, LinphoneChatRoomEncryptionBackendLime);
	linphone_chat_room_params_enable_encryption(params, TRUE);
	linphone_chat_room_params_enable_group(params, FALSE);
	linphone_chat_room_params_set_subject(params, "lime-server test");
	LinphoneAddress *peer = linphone_core_interpret_url(core, argv[0]);
	bctbx_list_t *participants = bctbx_list_append(NULL, peer);
	const LinphoneAddress *local =
	    linphone_account_params_get_identity_address(linphone_account_get_params(linphone_core_get_default_account(core)));
	LinphoneChatRoom *room = linphone_core_create_chat_room_6(core, params, local, participants);
	bctbx_list_free_with_data(participants, (bctbx_list_free_func)linphone_address_unref);
	linphone_chat_room_params_unref(params);
	if (!room) {
		emit("error", "\"message\":%s", json_quote(0, "linphone_core_create_chat_room_6 gave no room"));
		return finish("chat-send", "room", start);
	}
	follow_room(room);
	if (!device_iterate_until(device, room_joined, NULL, 0) || !chat.joined) return finish("chat-send", "joined", start);

	send_text(argv[1]);
	if (!device_iterate_until(device, sent_settled, NULL, 0) || !sent_delivered())
		return finish("chat-send", "delivered", start);
	if (!device_iterate_until(device, message_came, NULL, 0) || chat.received == 0)
		return finish("chat-send", "answer", start);
	return finish("chat-send", "all", start);
}
DRIVER_COMMAND("chat-send", command_chat_send)

static int command_chat_answer(Device *device, int argc, char **argv) {
	double start = device_now();
	if (argc < 1) {
		fprintf(stderr, "chat-answer TEXT\n");
		return 2;
	}
	add_chat_callbacks(device);
	if (!device_iterate_until(device, message_came, NULL, 0) || chat.received == 0)
		return finish("chat-answer", "message", start);
	/* Answering encrypts for the devices the focus named in its NOTIFY. */
	if (!device_iterate_until(device, room_joined, NULL, 0) || !chat.joined)
		return finish("chat-answer", "joined", start);
	send_text(argv[0]);
	if (!device_iterate_until(device, sent_settled, NULL, 0) || !sent_delivered())
		return finish("chat-answer", "delivered", start);
	return finish("chat-answer", "all", start);
}
DRIVER_COMMAND("chat-answer", command_chat_answer)
