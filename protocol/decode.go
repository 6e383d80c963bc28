package protocol

import "fmt"

// DecodeClient decodes and validates one client → broker frame.
//
// Errors are always *Error: CodeBadRequest for invalid JSON or a missing,
// ill-typed, out-of-enum or too long field (the message names the field,
// e.g. "targetSpec: required string"), CodeUnknownMessageType for a type
// this broker does not handle. The error's ReqID is the frame's _reqId
// whenever it could be read, even when other fields (or the JSON after it)
// are bad, and for a bad send its ID is the send's readable id. See the
// package documentation for the exact rules.
func DecodeClient(frame []byte) (ClientMessage, error) {
	var store [16]rawField // most frames have few fields: keep them on the stack
	fields, scanErr := scanTop(string(frame), store[:0])
	m, e := decodeClientObject(fields, scanErr)
	if e != nil {
		return nil, e
	}
	return m, nil
}

// FrameType returns a frame's "type" when it can be read, else "": what a frame that failed to
// decode meant to be (a frame before hello is answered no_hello whatever else is wrong in it).
func FrameType(frame []byte) string {
	var store [16]rawField
	fields, err := scanTop(string(frame), store[:0])
	if err != nil {
		return ""
	}
	typ, _, e := fields.str("type", 0)
	if e != nil {
		return ""
	}
	return typ
}

func decodeClientObject(fields object, scanErr error) (ClientMessage, *Error) {
	// _reqId first: every error below should echo it when readable.
	reqID, _, reqErr := fields.str("_reqId", MaxIDLen)
	if scanErr != nil {
		e := badRequest(scanErr.Error())
		if reqErr == nil {
			e.ReqID = reqID
		}
		return nil, e
	}
	if reqErr != nil {
		return nil, reqErr
	}
	m, e := decodeClientFields(fields)
	if e != nil {
		e.ReqID = reqID
		e.ID = sendID(fields)
		return nil, e
	}
	m.SetRequestID(reqID)
	return m, nil
}

// sendID returns a bad send's readable client id, echoed in the error's id
// like the ack's.
func sendID(o object) string {
	if typ, _, e := o.str("type", 0); e != nil || typ != TypeSend {
		return ""
	}
	id, _, e := o.str("id", MaxIDLen)
	if e != nil {
		return ""
	}
	return id
}

func decodeClientFields(o object) (ClientMessage, *Error) {
	typ, e := o.reqStr("type", 0)
	if e != nil {
		return nil, e
	}
	switch typ {
	case TypeSend:
		return decodeSend(o)
	case TypeHello:
		return decodeHello(o)
	case TypeClientAck:
		return decodeClientAck(o)
	case TypeListPeers:
		return &ListPeers{}, nil
	case TypeSetStatus:
		return decodeSetStatus(o)
	case TypeSetSummary:
		s, e := o.reqStr("summary", MaxSummaryLen)
		if e != nil {
			return nil, e
		}
		return &SetSummary{Summary: s}, nil
	case TypeJoinGroup:
		return decodeJoinGroup(o)
	case TypeLeaveGroup:
		name, e := groupName(o, "name")
		if e != nil {
			return nil, e
		}
		return &LeaveGroup{Name: name}, nil
	case TypeSetState:
		return decodeSetState(o)
	case TypeGetState:
		k, e := o.reqNonEmpty("key", MaxStateKeyLen)
		if e != nil {
			return nil, e
		}
		return &GetState{Key: k}, nil
	case TypeListState:
		return &ListState{}, nil
	case TypeMessageStatus:
		id, e := o.reqNonEmpty("messageId", MaxIDLen)
		if e != nil {
			return nil, e
		}
		return &MessageStatus{MessageID: id}, nil
	case TypeSessionHello:
		return decodeSessionHello(o)
	case TypeKick, TypeDisconnect:
		return decodeKick(o, typ == TypeDisconnect)
	case TypeBan:
		t, e := o.reqNonEmpty("target", MaxIDLen)
		if e != nil {
			return nil, e
		}
		r, e := o.optStr("reason", MaxSummaryLen)
		if e != nil {
			return nil, e
		}
		return &Ban{Target: t, Reason: r}, nil
	case TypeUnban:
		t, e := o.reqNonEmpty("target", MaxIDLen)
		if e != nil {
			return nil, e
		}
		return &Unban{Target: t}, nil
	case TypeListBans:
		return &ListBans{}, nil
	case TypeSetStats:
		return &SetStats{}, nil // what it reports is not kept: see SetStats
	default:
		return nil, &Error{
			Code:    CodeUnknownMessageType,
			Message: fmt.Sprintf("unknown message type %q", truncate(typ, 64)),
		}
	}
}

func decodeSend(o object) (*Send, *Error) {
	var m Send
	var e *Error
	if m.TargetSpec, e = o.reqNonEmpty("targetSpec", MaxTargetSpecLen); e != nil {
		return nil, e
	}
	p, e := o.reqStr("priority", 0)
	if e != nil {
		return nil, e
	}
	// Use the constants, so a decoded send holds no copy of the enum.
	switch Priority(p) {
	case PriorityNow:
		m.Priority = PriorityNow
	case PriorityNext:
		m.Priority = PriorityNext
	case PriorityLow:
		m.Priority = PriorityLow
	default:
		return nil, badRequest("priority: must be one of now, next, low")
	}
	// Opaque: only the JSON type is checked.
	if m.Nonce, e = o.reqStr("nonce", 0); e != nil {
		return nil, e
	}
	if m.Ciphertext, e = o.reqStr("ciphertext", 0); e != nil {
		return nil, e
	}
	if m.ID, e = o.optStr("id", MaxIDLen); e != nil {
		return nil, e
	}
	if m.ClientMessageID, e = o.optStr("client_message_id", MaxIDLen); e != nil {
		return nil, e
	}
	if m.RequestFingerprint, e = o.optStr("request_fingerprint", MaxIDLen); e != nil {
		return nil, e
	}
	return &m, nil
}

func decodeHello(o object) (*Hello, *Error) {
	var m Hello
	var e *Error
	if m.MeshID, e = o.reqStr("meshId", MaxIDLen); e != nil {
		return nil, e
	}
	if m.MemberID, e = o.reqStr("memberId", MaxIDLen); e != nil {
		return nil, e
	}
	// Keys and signature: types only. Their format is the broker's
	// "malformed" check, which must come after capacity and timestamp_skew.
	if m.Pubkey, e = o.reqStr("pubkey", 0); e != nil {
		return nil, e
	}
	if m.SessionPubkey, e = o.optStr("sessionPubkey", 0); e != nil {
		return nil, e
	}
	if m.DisplayName, e = o.optStr("displayName", MaxDisplayNameLen); e != nil {
		return nil, e
	}
	if m.SessionID, e = o.reqStr("sessionId", MaxIDLen); e != nil {
		return nil, e
	}
	pid, e := o.reqInt("pid")
	if e != nil {
		return nil, e
	}
	if m.PID, e = nonNegInt("pid", pid); e != nil {
		return nil, e
	}
	if m.CWD, e = o.reqStr("cwd", MaxCWDLen); e != nil {
		return nil, e
	}
	if m.Groups, e = groupList(o, "groups"); e != nil {
		return nil, e
	}
	if m.Timestamp, e = o.reqInt("timestamp"); e != nil {
		return nil, e
	}
	if m.Signature, e = o.reqStr("signature", 0); e != nil {
		return nil, e
	}
	v, _, e := o.integer("protocolVersion")
	if e != nil {
		return nil, e
	}
	if m.ProtocolVersion, e = nonNegInt("protocolVersion", v); e != nil {
		return nil, e
	}
	if m.Capabilities, e = o.stringList("capabilities", MaxCapabilities, MaxCapabilityLen, false); e != nil {
		return nil, e
	}
	m.Hostname, m.PeerType, m.Channel, m.Model = connectionFields(o)
	return &m, nil
}

// connectionFields reads what today's CLI says about a connection in its
// hello; descriptive only, so odd values are dropped (see describe).
func connectionFields(o object) (hostname, peerType, channel, model string) {
	return o.describe("hostname", MaxDisplayNameLen), o.describe("peerType", MaxRoleLen),
		o.describe("channel", MaxRoleLen), o.describe("model", MaxDisplayNameLen)
}

func decodeSessionHello(o object) (*SessionHello, *Error) {
	var m SessionHello
	var e *Error
	if m.MeshID, e = o.reqStr("meshId", MaxIDLen); e != nil {
		return nil, e
	}
	if m.ParentMemberID, e = o.optStr("parentMemberId", MaxIDLen); e != nil {
		return nil, e
	}
	// Keys and signatures: types only; their formats are the session_hello checks.
	if m.ParentMemberPubkey, e = o.reqStr("parentMemberPubkey", 0); e != nil {
		return nil, e
	}
	if m.SessionPubkey, e = o.reqStr("sessionPubkey", 0); e != nil {
		return nil, e
	}
	f, e := o.present("parentAttestation")
	if e != nil {
		return nil, e
	}
	if f != nil {
		if f.kind != '{' {
			return nil, badRequest("parentAttestation: must be an object")
		}
		a, err := parseObject(f.val)
		if err != nil {
			return nil, badRequest("parentAttestation: " + err.Error())
		}
		if m.ParentAttestation.SessionPubkey, e = a.optStr("sessionPubkey", 0); e != nil {
			e.Message = "parentAttestation." + e.Message
			return nil, e
		}
		if m.ParentAttestation.ParentMemberPubkey, e = a.optStr("parentMemberPubkey", 0); e != nil {
			e.Message = "parentAttestation." + e.Message
			return nil, e
		}
		if m.ParentAttestation.ExpiresAt, _, e = a.integer("expiresAt"); e != nil {
			e.Message = "parentAttestation." + e.Message
			return nil, e
		}
		if m.ParentAttestation.Signature, e = a.optStr("signature", 0); e != nil {
			e.Message = "parentAttestation." + e.Message
			return nil, e
		}
	}
	if m.DisplayName, e = o.optStr("displayName", MaxDisplayNameLen); e != nil {
		return nil, e
	}
	if m.SessionID, e = o.reqStr("sessionId", MaxIDLen); e != nil {
		return nil, e
	}
	pid, _, e := o.integer("pid")
	if e != nil {
		return nil, e
	}
	if m.PID, e = nonNegInt("pid", pid); e != nil {
		return nil, e
	}
	if m.CWD, e = o.optStr("cwd", MaxCWDLen); e != nil {
		return nil, e
	}
	m.Hostname, m.PeerType, m.Channel, m.Model = connectionFields(o)
	if m.Groups, e = groupList(o, "groups"); e != nil {
		return nil, e
	}
	if m.Role, e = o.optStr("role", MaxRoleLen); e != nil {
		return nil, e
	}
	if m.Timestamp, e = o.reqInt("timestamp"); e != nil {
		return nil, e
	}
	if m.Signature, e = o.reqStr("signature", 0); e != nil {
		return nil, e
	}
	v, _, e := o.integer("protocolVersion")
	if e != nil {
		return nil, e
	}
	if m.ProtocolVersion, e = nonNegInt("protocolVersion", v); e != nil {
		return nil, e
	}
	if m.Capabilities, e = o.stringList("capabilities", MaxCapabilities, MaxCapabilityLen, false); e != nil {
		return nil, e
	}
	return &m, nil
}

func decodeKick(o object, disconnect bool) (*Kick, *Error) {
	m := Kick{Disconnect: disconnect}
	var e *Error
	if m.Target, e = o.optStr("target", MaxIDLen); e != nil {
		return nil, e
	}
	stale, _, e := o.integer("stale")
	if e != nil {
		return nil, e
	}
	if stale < 0 {
		return nil, badRequest("stale: must be a non-negative number of milliseconds")
	}
	m.Stale = stale
	if m.All, e = o.optBool("all"); e != nil {
		return nil, e
	}
	// One selector: the broker used to let all override stale and stale override target, so
	// {target:"bob", stale:60000} ended every stale session of the mesh instead of bob's.
	n := 0
	for _, set := range []bool{m.Target != "", m.Stale > 0, m.All} {
		if set {
			n++
		}
	}
	if n > 1 {
		return nil, badRequest(m.Type() + ": give one of target, stale and all")
	}
	return &m, nil
}

func decodeClientAck(o object) (*ClientAck, *Error) {
	var m ClientAck
	var e *Error
	if m.BrokerMessageID, e = o.optStr("brokerMessageId", MaxIDLen); e != nil {
		return nil, e
	}
	if m.BrokerMessageIDs, e = o.stringList("brokerMessageIds", MaxAckIDs, MaxIDLen, true); e != nil {
		return nil, e
	}
	if m.ClientMessageID, e = o.optStr("clientMessageId", MaxIDLen); e != nil {
		return nil, e
	}
	if m.BrokerMessageID == "" && len(m.BrokerMessageIDs) == 0 && m.ClientMessageID == "" {
		return nil, badRequest("brokerMessageId: required string (or brokerMessageIds: non-empty list of strings)")
	}
	return &m, nil
}

func decodeSetStatus(o object) (*SetStatus, *Error) {
	s, e := o.reqStr("status", 0)
	if e != nil {
		return nil, e
	}
	st, ok := parseStatus(s)
	if !ok {
		return nil, badRequest("status: must be one of idle, working, dnd")
	}
	return &SetStatus{Status: st}, nil
}

// parseStatus returns the Status constant equal to s.
func parseStatus(s string) (Status, bool) {
	switch Status(s) {
	case StatusIdle:
		return StatusIdle, true
	case StatusWorking:
		return StatusWorking, true
	case StatusDND:
		return StatusDND, true
	}
	return "", false
}

func decodeJoinGroup(o object) (*JoinGroup, *Error) {
	var m JoinGroup
	var e *Error
	if m.Name, e = groupName(o, "name"); e != nil {
		return nil, e
	}
	if m.Role, e = o.optStr("role", MaxRoleLen); e != nil {
		return nil, e
	}
	return &m, nil
}

func decodeSetState(o object) (*SetState, *Error) {
	var m SetState
	var e *Error
	if m.Key, e = o.reqNonEmpty("key", MaxStateKeyLen); e != nil {
		return nil, e
	}
	if m.Value, e = o.rawJSON("value"); e != nil {
		return nil, e
	}
	return &m, nil
}

// groupName reads a required group name member.
func groupName(o object, field string) (string, *Error) {
	name, e := o.reqStr(field, 0)
	if e != nil {
		return "", e
	}
	if err := CheckGroupName(name); err != nil {
		return "", badRequest(field + ": " + err.Error())
	}
	return name, nil
}

// groupList reads an optional [{name, role?}] member.
func groupList(o object, field string) ([]Group, *Error) {
	items, e := o.list(field, MaxGroups)
	if e != nil || len(items) == 0 {
		return nil, e
	}
	groups := make([]Group, len(items))
	for i := range items {
		prefix := fmt.Sprintf("%s[%d]", field, i)
		if items[i].kind != '{' {
			return nil, badRequest(prefix + ": must be an object")
		}
		g, err := parseObject(items[i].val)
		if err != nil {
			return nil, badRequest(prefix + ": " + err.Error()) // e.g. too many fields
		}
		if groups[i].Name, e = groupName(g, "name"); e != nil {
			e.Message = prefix + "." + e.Message
			return nil, e
		}
		if groups[i].Role, e = g.optStr("role", MaxRoleLen); e != nil {
			e.Message = prefix + "." + e.Message
			return nil, e
		}
	}
	return groups, nil
}
