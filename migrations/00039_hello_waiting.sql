-- +goose Up
-- Which hellos of a batch have something waiting for them: the positions of the hellos (from
-- 1) whose member has a pending delivery, any member with the hello's key in its mesh (a
-- superset: a hello wrongly said to have something only costs the claim it had before). The
-- replica sends it in the hello's own flight, after the hello's COMMIT (store.Hellos), and
-- claims only for sessions it names, or that resumed or replaced one, or that were registered
-- while the replica looked for sessions to deliver to. Every hello used to be followed by a
-- claim, which in a connect storm was a statement per few hellos that found nothing.
-- +goose StatementBegin
CREATE FUNCTION claudemesh.hello_waiting(h_mesh text[], h_pubkey text[]) RETURNS SETOF int
LANGUAGE sql STABLE AS $$
    SELECT u.ord::int
    FROM unnest(h_mesh, h_pubkey) WITH ORDINALITY AS u(mesh, pubkey, ord)
    WHERE EXISTS (SELECT 1 FROM claudemesh.member m
                  JOIN claudemesh.delivery d ON d.recipient_member_id = m.id AND d.state = 'pending'
                  WHERE m.mesh_id = u.mesh AND m.pubkey = u.pubkey)
$$;
-- +goose StatementEnd

-- +goose Down
DROP FUNCTION claudemesh.hello_waiting(text[], text[]);
